//! placeholder (interdomain registry routing, in progress)
