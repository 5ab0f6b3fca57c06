"""The bcc observer of the kernel handoff (README.md here). Imports nothing of bcc."""
