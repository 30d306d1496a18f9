"""The Textual dashboard: the only part of mvtui that imports Textual."""
