"""Manifests from local copies of published corpora (``mmssl data prepare``).

One module per corpus (``librispeech``, ``lrs3``, ``voxceleb2``, ``spokencoco``,
``flickr8k``, ``musan``), each with ``collect(root, splits, ...) -> Listing``; ``common``
measures the media from their headers and writes the manifests; the command is
``mmssl.commands.data_prepare``.
Each corpus's layout and next steps are in ``datasets/<corpus>/README.md``.
"""
