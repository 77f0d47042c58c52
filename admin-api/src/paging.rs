//! The one check of the admin list routes' paging parameters.

/// The most entries a page holds.
const MAX_LIMIT: u32 = 500;

/// A checked page request: at most `limit` entries (1 to 500), older than `before`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Page {
    /// Entries per page.
    pub(crate) limit: u32,
    /// Only entries below this id or version: the previous page's `next`.
    pub(crate) before: Option<i64>,
}

impl Page {
    /// `limit` (`default` when absent) and `before` checked; the refusal says which is wrong.
    pub(crate) fn new(
        limit: Option<u32>,
        default: u32,
        before: Option<i64>,
    ) -> Result<Self, &'static str> {
        let limit = limit.unwrap_or(default);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err("limit must be 1 to 500");
        }
        if before.is_some_and(|before| before < 1) {
            return Err("before must be above 0");
        }
        Ok(Self { limit, before })
    }

    /// Where the next page starts: the last entry's key when this page is full.
    pub(crate) fn next<T, K>(&self, entries: &[T], key: impl Fn(&T) -> K) -> Option<K> {
        (entries.len() == self.limit as usize)
            .then(|| entries.last().map(key))
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::Page;

    #[test]
    fn limits_and_cursors_are_checked() {
        assert_eq!(Page::new(None, 50, None).map(|page| page.limit), Ok(50));
        assert_eq!(
            Page::new(Some(500), 50, Some(1)).map(|page| page.limit),
            Ok(500)
        );
        assert_eq!(
            Page::new(Some(0), 50, None).err(),
            Some("limit must be 1 to 500")
        );
        assert_eq!(
            Page::new(Some(501), 50, None).err(),
            Some("limit must be 1 to 500")
        );
        assert_eq!(
            Page::new(Some(5), 50, Some(0)).err(),
            Some("before must be above 0")
        );
    }

    #[test]
    fn a_full_page_points_at_the_next() {
        let page = Page::new(Some(2), 50, None).expect("a valid page");
        assert_eq!(page.next(&[3, 2], |entry| *entry), Some(2));
        assert_eq!(page.next(&[3], |entry| *entry), None);
    }
}
