"""Protocol adapters: request shapes other than OpenAI's, served by translating each request
into an OpenAI request to mvtui's own front door, and its answer back (base.py)."""
