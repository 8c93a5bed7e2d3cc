"""Modules laid out like other checkpointing libraries, so that moving to aiockpt is a
change of import prefix (see ``aiockpt.compat.nvrx``)."""
