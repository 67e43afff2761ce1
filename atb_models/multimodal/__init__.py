"""Turning a request of images, videos and text into model inputs: media loading and sizing (media.py), the chat
prompt with expanded vision placeholders (prompt.py), M-RoPE positions (rope_index.py), and sharing preprocessed
media between the ranks of a node (shm.py, node_share.py).

The package itself imports nothing, so that checking a media file (`media.probe_media_file`) stays torch-free."""
