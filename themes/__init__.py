"""The dashboard themes shipped with mvtui: this folder is packaged as `mvtui.themes`
(pyproject.toml maps it), and mvtui.ui.themes reads the TOML files in it."""
