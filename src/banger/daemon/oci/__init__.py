"""OCI images: references, the registry client, the blob cache and layer flattening.

A leaf subpackage (no daemon state): ``reference`` parses image references,
``registry`` speaks the registry HTTP API v2 (anonymous and bearer-token auth,
manifests, indexes, digest-verified blobs), ``blobs`` is the content-addressed cache
under ``cache_dir``, ``flatten`` applies layers to a staging tree and makes the ext4.
Everything read from a registry or a layer is untrusted.
"""
