"""Small shared utilities, used by every stage: errors, atomic files and JSONL (io), where datasets live
(paths), progress lines (progress) and lazy package namespaces (lazy)."""
