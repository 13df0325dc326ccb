//! The one line a service needs: an rpath to the libtorch that tch-mix was built against.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_MIX_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
