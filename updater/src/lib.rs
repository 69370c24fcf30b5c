//! Outpost update path (work in progress).
