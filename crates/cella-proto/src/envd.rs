//! E2B envd protocol types (filled in by the agent work).
