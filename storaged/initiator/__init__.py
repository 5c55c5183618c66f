"""storaged's iSCSI initiator: a sans-IO core (``session``), an asyncio shell
(``client``) and a BlockDevice over a remote LUN (``device``)."""
