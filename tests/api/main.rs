//! Brokerage's integration tests: one binary, brokers on port 0 (in this process) or as
//! real processes, against the throwaway MariaDB that `scripts/test` starts.

mod bad_input;
mod cli;
mod contract;
mod cubrid;
mod deploy;
mod durability;
mod faults;
mod federation;
mod fuzz_regressions;
mod helpers;
mod isolation;
mod lifecycle;
mod limits;
mod logs;
mod mongodb;
mod mysql_tls;
mod openapi;
mod operator;
mod postgresql;
mod protocol;
mod quota;
mod redis;
mod sso;
mod store_contract;
mod swift;
mod versions;
