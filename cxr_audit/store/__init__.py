from cxr_audit.store.h5 import create_scan_file, open_scan, read_meta
from cxr_audit.store.schema import SCHEMA_VERSION, validate

__all__ = ["create_scan_file", "open_scan", "read_meta", "validate", "SCHEMA_VERSION"]
