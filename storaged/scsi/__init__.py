"""SCSI semantics (SPC-4 / SBC-3): command dispatch, sense data, logical units."""
