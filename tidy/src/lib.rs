//! Tree checks; see tests/.
