"""storaged: iSCSI/NFS storage server with RAID, DLM and fencing."""

__version__ = "0.1.0"
