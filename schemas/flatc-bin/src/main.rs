//! Prints the path of the flatc binary built by the `flatc` crate.
fn main() {
    println!("{}", flatc::flatc().display());
}
