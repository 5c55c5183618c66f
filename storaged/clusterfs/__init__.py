"""clusterfs: a GFS2/OCFS2-style shared-disk filesystem on the storaged DLM (FUSE shell)."""
