"""Starts, watches and stops the torchrun worker group for the ComfyUI process; the client the nodes call.

Imports the core's config and transport only, never ComfyUI.
"""
