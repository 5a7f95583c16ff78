"""Import-time stand-ins; see sitecustomize.py."""
