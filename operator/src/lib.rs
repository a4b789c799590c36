//! The Trimtab operator. Its controllers arrive with the BalancerPolicy and LoadTest controller work.
#![forbid(unsafe_code)]
