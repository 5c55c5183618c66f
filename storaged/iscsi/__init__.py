"""iSCSI (RFC 7143): sans-IO protocol core and the asyncio target shell."""
