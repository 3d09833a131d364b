"""`qm audit`: the exclusivity promise checked on the event history of ``qm.events``."""
