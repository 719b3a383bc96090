"""pytest plugin for offload (entry point ``pytest11``): fixtures for users' test suites."""
