"""LVS-style login balancing for iSCSI: schedulers, virtual services, CLI.

``storaged.lb.sched`` is the sans-IO core (the ten IPVS schedulers with
weights, thresholds and persistence); ``storaged.lb.records`` the persistent
virtual services; ``storaged.lb.ops`` the control operations; and
``storaged.lb.cli`` the ipvsadm-shaped ``storaged lb`` command.
"""
