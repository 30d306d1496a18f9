"""Models as Ollama treats them: the local Hugging Face cache (`cache.py`, `kinds.py`),
downloads into it (`pull.py`), a terminal chat (`chat.py`) and near-name suggestions
(`names.py`). huggingface_hub and openai are imported inside the functions that use them, so
importing this package costs nothing; the CLI's commands (`mvtui models`, `pull`, `run`,
`assign`) load it only when they run.
"""
