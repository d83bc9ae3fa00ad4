//! What the model is shown for each evaluated item: its rendered prompt, optional solved
//! examples (shots) before it, and the chat template or not. Shots come from the dataset's train
//! split, chosen per item by a seeded order, and never include the item itself.

use crate::data::split::seeded_order;
use crate::data::stored::StoredRecord;
use crate::model::Model;
use crate::model::chat::Message;

/// One solved example: its prompt and its answer.
pub struct Shot<'a> {
    pub prompt: &'a str,
    pub answer: String,
}

/// Up to `k` train records for `item`, in an order seeded by `seed` and the item's id.
pub fn shot_records<'a>(
    item: &StoredRecord,
    train: &'a [StoredRecord],
    k: usize,
    seed: u64,
) -> Vec<&'a StoredRecord> {
    if k == 0 {
        return vec![];
    }
    let ids: Vec<&str> = train.iter().map(|r| r.id.as_str()).collect();
    let item_seed = seed
        ^ u64::from_le_bytes(
            blake3::hash(item.id.as_bytes()).as_bytes()[..8]
                .try_into()
                .expect("8 bytes"),
        );
    seeded_order(&ids, item_seed)
        .into_iter()
        .map(|i| &train[i])
        .filter(|r| r.id != item.id)
        .take(k)
        .collect()
}

/// The text the model continues: shots then the prompt, through the chat template (shots as
/// earlier turns) or as plain text (examples separated by blank lines). In plain text the
/// answer follows its prompt after a space, as it will be scored or generated.
pub fn render(
    model: &Model,
    prompt: &str,
    shots: &[Shot],
    chat: bool,
) -> Result<String, crate::model::error::ModelError> {
    if chat {
        let mut messages = Vec::with_capacity(2 * shots.len() + 1);
        for shot in shots {
            messages.push(Message::user(shot.prompt));
            messages.push(Message::assistant(shot.answer.clone()));
        }
        messages.push(Message::user(prompt));
        let template = model.chat.as_ref().ok_or_else(|| {
            crate::model::error::ModelError::load(
                &model.path,
                "the model has no chat template (set `chat: false`)",
            )
        })?;
        template.render(&messages)
    } else {
        let mut text = String::new();
        for shot in shots {
            text.push_str(shot.prompt);
            text.push(' ');
            text.push_str(&shot.answer);
            text.push_str("\n\n");
        }
        text.push_str(prompt);
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> StoredRecord {
        StoredRecord {
            id: id.into(),
            split: "train".into(),
            prompt: format!("q{id}"),
            target: Some(format!("a{id}")),
            fields: Default::default(),
        }
    }

    #[test]
    fn shots_are_seeded_per_item_and_never_the_item() {
        let train: Vec<StoredRecord> = (0..20).map(|i| rec(&i.to_string())).collect();
        let item = rec("3");
        let a = shot_records(&item, &train, 5, 7);
        assert_eq!(a.len(), 5);
        assert!(a.iter().all(|r| r.id != "3"));
        let again = shot_records(&item, &train, 5, 7);
        assert_eq!(
            a.iter().map(|r| &r.id).collect::<Vec<_>>(),
            again.iter().map(|r| &r.id).collect::<Vec<_>>()
        );
        let other = shot_records(&rec("4"), &train, 5, 7);
        assert_ne!(
            a.iter().map(|r| &r.id).collect::<Vec<_>>(),
            other.iter().map(|r| &r.id).collect::<Vec<_>>()
        );
        assert_eq!(shot_records(&item, &train[3..4], 5, 7).len(), 0);
    }
}
