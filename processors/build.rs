// `sqlx::migrate!` embeds the migrations at compile time, but cargo does not know that it
// reads them: without this, a new migration file would leave a stale binary behind.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
