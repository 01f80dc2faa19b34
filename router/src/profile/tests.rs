//! Profile parsing and validation.
use super::*;

fn parse(text: &str) -> Result<Profile, ProfileError> {
    Profile::parse(text, Path::new("test.toml"))
}

#[test]
fn every_shipped_profile_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Profile::load(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 2);
}

const BASE: &str = "model = \"m.gguf\"\nplacement = \"disaggregated\"\n";

#[test]
fn disaggregation_needs_two_roles() {
    let one =
        format!("{BASE}[[nodes]]\nname = \"a\"\naddress = \"embedded\"\nrole = \"prefill\"\n");
    assert!(matches!(parse(&one), Err(ProfileError::Invalid { .. })));
    let two = format!(
        "{one}[[nodes]]\nname = \"b\"\naddress = \"10.0.0.2:7070\"\nrole = \"decode\"\nslots = 8\n"
    );
    let p = parse(&two).unwrap();
    assert_eq!(
        p.nodes[1].address,
        NodeAddress::Remote("10.0.0.2:7070".into())
    );
    assert_eq!(p.nodes[1].slots, 8);
    assert_eq!(p.listen.to_string(), DEFAULT_LISTEN);
}

#[test]
fn mistakes_are_refused_with_their_reason() {
    let unknown_key = format!("{BASE}colour = \"red\"\n");
    assert!(matches!(
        parse(&unknown_key),
        Err(ProfileError::Parse { .. })
    ));
    let bad_role =
        format!("{BASE}[[nodes]]\nname = \"a\"\naddress = \"embedded\"\nrole = \"chef\"\n");
    assert!(parse(&bad_role).unwrap_err().to_string().contains("chef"));
    let bad_addr =
        format!("{BASE}[[nodes]]\nname = \"a\"\naddress = \"nowhere\"\nrole = \"both\"\n");
    assert!(
        parse(&bad_addr)
            .unwrap_err()
            .to_string()
            .contains("host:port")
    );
    let bad_codec = format!("{BASE}[kv]\ncodec = \"zip\"\n");
    assert!(parse(&bad_codec).unwrap_err().to_string().contains("zip"));
    let colocated = "model = \"m\"\nplacement = \"colocated\"\n[[nodes]]\nname = \"a\"\naddress = \"embedded\"\nrole = \"prefill\"\n";
    assert!(parse(colocated).unwrap_err().to_string().contains("both"));
}

#[test]
fn threads_belong_to_embedded_nodes() {
    let node = |address: &str, threads: &str| {
        format!(
            "{BASE}[[nodes]]\nname = \"a\"\naddress = \"embedded\"\nrole = \"prefill\"\n[[nodes]]\nname = \"b\"\naddress = \"{address}\"\nrole = \"decode\"\n{threads}"
        )
    };
    let p = parse(&node("embedded", "threads = 3\n")).unwrap();
    assert_eq!((p.nodes[0].threads, p.nodes[1].threads), (None, Some(3)));
    let remote = parse(&node("10.0.0.2:7070", "threads = 3\n")).unwrap_err();
    assert!(remote.to_string().contains("--threads"), "{remote}");
    let zero = parse(&node("embedded", "threads = 0\n")).unwrap_err();
    assert!(zero.to_string().contains("at least 1"), "{zero}");
}

#[test]
fn a_profile_of_several_models_narrows_to_one() {
    let node = |name: &str, role: &str, model: &str| {
        let model = if model.is_empty() {
            String::new()
        } else {
            format!("model = \"{model}\"\n")
        };
        format!("[[nodes]]\nname = \"{name}\"\naddress = \"embedded\"\nrole = \"{role}\"\n{model}")
    };
    let link = |a: &str, b: &str, gbit: f64| {
        format!(
            "[[links]]\nbetween = [\"{a}\", \"{b}\"]\nkind = \"ethernet\"\nbandwidth_gbit_s = {gbit}\nlatency_ms = 0.1\n"
        )
    };
    let text = [
        BASE.to_string(),
        node("p", "prefill", ""),
        node("other", "prefill", "models/b.gguf"),
        node("d", "decode", ""),
        node("other-d", "decode", "models/b.gguf"),
        link("p", "d", 10.0),
        link("p", "other", 1.0),
    ]
    .concat();
    let p = parse(&text).unwrap();
    assert_eq!(p.model_names(), vec!["m".to_string(), "b".to_string()]);
    assert!(
        p.for_model(None)
            .unwrap_err()
            .contains("name one with --model")
    );
    assert!(p.for_model(Some("c")).unwrap_err().contains("it runs m, b"));
    let m = p.for_model(Some("m")).unwrap();
    let names: Vec<&str> = m.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["p", "d"]);
    assert_eq!(m.links.len(), 1);
    assert_eq!((m.links[0].0, m.links[0].1), (0, 1));
    assert_eq!(m.links[0].2.bandwidth_gbit_s, 10.0);
    let b = p.for_model(Some("b")).unwrap();
    assert_eq!((b.nodes.len(), b.links.len()), (2, 0));
    assert_eq!(b.model, Path::new("models/b.gguf"));
    // Each model's nodes must serve its requests on their own: one "both" node cannot split.
    let lonely = [
        BASE.to_string(),
        node("p", "prefill", ""),
        node("d", "decode", ""),
        node("x", "both", "models/b.gguf"),
    ]
    .concat();
    let refused = parse(&lonely).unwrap_err().to_string();
    assert!(
        refused.contains("the nodes of model models/b.gguf"),
        "{refused}"
    );
    // One model: as it is.
    let one = parse(
        &[
            BASE.to_string(),
            node("x", "prefill", ""),
            node("y", "decode", ""),
        ]
        .concat(),
    )
    .unwrap();
    assert_eq!(one.for_model(None).unwrap(), one);
}

#[test]
fn handoff_pieces_are_pinned_only_to_a_known_count() {
    let nodes = "[[nodes]]\nname = \"p\"\naddress = \"embedded\"\nrole = \"prefill\"\n[[nodes]]\nname = \"d\"\naddress = \"embedded\"\nrole = \"decode\"\n";
    let pinned = format!("{BASE}[policy]\nhandoff_pieces = 4\n{nodes}");
    assert_eq!(parse(&pinned).unwrap().policy.handoff_pieces, Some(4));
    let chosen = format!("{BASE}{nodes}");
    assert_eq!(parse(&chosen).unwrap().policy.handoff_pieces, None);
    let odd = format!("{BASE}[policy]\nhandoff_pieces = 3\n{nodes}");
    assert!(
        parse(&odd)
            .unwrap_err()
            .to_string()
            .contains("handoff_pieces")
    );
}
