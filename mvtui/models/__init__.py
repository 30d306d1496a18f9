"""Models as Ollama treats them: the local Hugging Face cache (`cache.py`, `kinds.py`),
downloads into it (`pull.py`), a terminal chat (`chat.py`) and near-name suggestions
(`names.py`). huggingface_hub and openai are imported inside the functions that use them,
so importing a module here loads neither; the CLI's commands (`mvtui models`, `pull`, `run`,
`assign`) load this package only when they run. Failures are `mvtui.errors.CommandError`s
whose message is for the operator.
"""
