//! Named style presets for the public API: each wraps the caller's prompt in a
//! template and adds to the negative prompt, like the `style` selector of the
//! prompt-to-image apps sdserve replaces.

use serde::Serialize;

/// One preset. `prompt` contains `{prompt}` where the caller's text goes.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Style {
    pub name: &'static str,
    pub label: &'static str,
    pub prompt: &'static str,
    pub negative_prompt: &'static str,
}

/// The style used when a request names none.
pub const DEFAULT_STYLE: &str = "none";

/// Every preset, in the order the page lists them.
pub const STYLES: &[Style] = &[
    Style {
        name: "none",
        label: "None",
        prompt: "{prompt}",
        negative_prompt: "",
    },
    Style {
        name: "realistic",
        label: "Realistic photo",
        prompt: "photograph of {prompt}, 50mm, natural light, highly detailed, sharp focus",
        negative_prompt: "cartoon, drawing, painting, illustration, anime, lowres, blurry",
    },
    Style {
        name: "anime",
        label: "Anime",
        prompt: "anime artwork of {prompt}, anime style, key visual, vibrant, studio anime",
        negative_prompt: "photo, photorealistic, realism, lowres, blurry",
    },
    Style {
        name: "digital-art",
        label: "Digital art",
        prompt: "concept art of {prompt}, digital artwork, illustrative, painterly, highly detailed",
        negative_prompt: "photo, photorealistic, lowres, blurry",
    },
    Style {
        name: "oil-painting",
        label: "Oil painting",
        prompt: "oil painting of {prompt}, visible brush strokes, canvas texture, fine art",
        negative_prompt: "photo, photorealistic, digital, 3d render, lowres",
    },
    Style {
        name: "pixel-art",
        label: "Pixel art",
        prompt: "pixel-art {prompt}, low-res, blocky, 16-bit game sprite style",
        negative_prompt: "photo, photorealistic, smooth, blurry, 3d render",
    },
    Style {
        name: "watercolor",
        label: "Watercolor",
        prompt: "watercolor painting of {prompt}, soft washes, paper texture, delicate",
        negative_prompt: "photo, photorealistic, 3d render, harsh lines",
    },
];

/// The preset called `name`, if there is one.
pub fn find(name: &str) -> Option<&'static Style> {
    STYLES.iter().find(|s| s.name == name)
}

/// Comma-separated preset names, for error messages.
pub fn names() -> String {
    STYLES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
}

/// Characters the longest template adds to the caller's text, and the
/// longest preset negative prompt (with its `", "`) adds to the caller's
/// negative prompt: the room the prompt limit leaves styles.
pub fn overheads() -> (usize, usize) {
    let prompt = STYLES
        .iter()
        .map(|s| s.prompt.replace("{prompt}", "").chars().count())
        .max()
        .unwrap_or(0);
    let negative = STYLES
        .iter()
        .map(|s| match s.negative_prompt.chars().count() {
            0 => 0,
            n => n + 2,
        })
        .max()
        .unwrap_or(0);
    (prompt, negative)
}

impl Style {
    /// The prompt and negative prompt the model sees: the caller's prompt in the
    /// template, the caller's negative prompt joined to the preset's. With
    /// neither giving a negative prompt there is none (`None`, not `""`: SDXL
    /// models tell the two apart).
    pub fn apply(&self, prompt: &str, negative_prompt: Option<&str>) -> (String, Option<String>) {
        let styled = self.prompt.replace("{prompt}", prompt);
        let negative = match (self.negative_prompt, negative_prompt.map(str::trim)) {
            ("", n) => n.map(str::to_string),
            (s, None | Some("")) => Some(s.to_string()),
            (s, Some(n)) => Some(format!("{n}, {s}")),
        };
        (styled, negative)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_templates_take_the_prompt() {
        let mut names: Vec<_> = STYLES.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), STYLES.len());
        for s in STYLES {
            assert!(
                s.prompt.contains("{prompt}"),
                "{} has no {{prompt}}",
                s.name
            );
        }
        assert!(find(DEFAULT_STYLE).is_some());
    }

    #[test]
    fn apply_wraps_the_prompt_and_joins_negatives() {
        let none = find("none").unwrap();
        let some = |s: &str| Some(s.to_string());
        assert_eq!(none.apply("a cat", None), ("a cat".into(), None));
        assert_eq!(none.apply("a cat", Some("")), ("a cat".into(), some("")));
        assert_eq!(
            none.apply("a cat", Some("dog")),
            ("a cat".into(), some("dog"))
        );
        let anime = find("anime").unwrap();
        let (p, n) = anime.apply("a cat", Some("dog"));
        assert!(p.starts_with("anime artwork of a cat,"), "{p}");
        assert!(n.as_deref().unwrap().starts_with("dog, photo"), "{n:?}");
        assert_eq!(
            anime.apply("a cat", Some(" ")).1,
            some(anime.negative_prompt)
        );
        assert_eq!(anime.apply("a cat", None).1, some(anime.negative_prompt));
    }
}
