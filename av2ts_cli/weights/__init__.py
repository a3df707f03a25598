"""Everything about weights: where a model comes from and how it is stored.

- ``checkpoint.py``: the av2ts checkpoint format (a folder: ``model.safetensors`` + ``config.json``), its checks;
- ``registry.py``: the one table of model names a user can ask for (``--model NAME``, ``av2ts download NAME``);
- ``hub.py``: all Hugging Face Hub access (``hf://owner/repo[@revision][/subfolder]``) and its error lines;
- ``upstream.py``: registry models converted from their upstream files once, on first use;
- ``resolve.py``: ``resolve_model``, THE one resolver of ``--model``;
- ``mapping.py``: the converters' shared machinery; ``convert_<family>.py``: one importer per model family;
  ``convert.py``: the table of kinds behind ``av2ts convert``.

A new family adds its registry entries and a ``convert_<family>.py``; nothing else here changes.
"""
