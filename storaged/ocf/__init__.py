"""OCF resource agents for pacemaker (``storaged ocf install``)."""
