use super::*;

fn files(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn names_parse_and_paths_do_not() {
    let n = HubName::parse("bartowski/gemma-3-270m-it-GGUF:Q8_0").unwrap();
    assert_eq!(n.repo, "bartowski/gemma-3-270m-it-GGUF");
    assert_eq!(n.pick, Pick::Tag("Q8_0".into()));
    assert_eq!(HubName::parse("org/repo").unwrap().pick, Pick::Default);
    for path in [
        "models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "/abs/model.gguf",
        "./rel/x",
        "model.gguf",
        "a/b/c",
        "org/repo:bad tag",
        "../up/repo",
    ] {
        assert_eq!(HubName::parse(path), None, "{path}");
    }
}

#[test]
fn the_tag_picks_one_file_as_a_word() {
    let repo = files(&[
        "README.md",
        "model-Q4_K.gguf",
        "model-Q4_K_M.gguf",
        "model.Q8_0.gguf",
        "model-f16.gguf",
    ]);
    let pick = |tag: &str| {
        let name = HubName::parse(&format!("o/r:{tag}")).unwrap();
        choose(&repo, &name)
    };
    assert_eq!(pick("Q4_K_M").unwrap(), "model-Q4_K_M.gguf");
    assert_eq!(pick("q4_k").unwrap(), "model-Q4_K.gguf");
    assert_eq!(pick("Q8_0").unwrap(), "model.Q8_0.gguf");
    assert_eq!(pick("F16").unwrap(), "model-f16.gguf");
    let missing = pick("Q5_K_S").unwrap_err().to_string();
    assert!(
        missing.contains("model-Q4_K_M.gguf, model.Q8_0.gguf"),
        "{missing}"
    );
    let split = files(&[
        "big-Q4_K_M-00001-of-00002.gguf",
        "big-Q4_K_M-00002-of-00002.gguf",
    ]);
    let name = HubName::parse("o/r:Q4_K_M").unwrap();
    assert!(matches!(
        choose(&split, &name),
        Err(HubError::Split { parts: 2, .. })
    ));
}

#[test]
fn a_bare_repository_takes_q4_k_m_or_its_only_gguf() {
    let name = HubName::parse("o/r").unwrap();
    let many = files(&["m-Q8_0.gguf", "m-Q4_K_M.gguf"]);
    assert_eq!(choose(&many, &name).unwrap(), "m-Q4_K_M.gguf");
    let one = files(&["README.md", "m-Q8_0.gguf"]);
    assert_eq!(choose(&one, &name).unwrap(), "m-Q8_0.gguf");
    let two = files(&["m-Q8_0.gguf", "m-f16.gguf"]);
    assert!(choose(&two, &name).is_err());
}

#[test]
fn only_paths_inside_a_repository_are_taken_from_a_listing() {
    for ok in ["m-Q4_K_M.gguf", "quants/m-Q8_0.gguf"] {
        assert!(is_plain_path(ok), "{ok}");
    }
    for bad in [
        "",
        "../m.gguf",
        "a/../../m.gguf",
        "/etc/m.gguf",
        "a//m.gguf",
        "./m.gguf",
        "a\\m.gguf",
    ] {
        assert!(!is_plain_path(bad), "{bad}");
    }
}
