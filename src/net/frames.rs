//! Following the HTTP/2 frames a connection writes, to count the refusals
//! made inside the HTTP/2 layer (`RST_STREAM`, `GOAWAY`).

pub(super) const FRAME_RST_STREAM: u8 = 0x3;
pub(super) const FRAME_GOAWAY: u8 = 0x7;
pub(super) const PROTOCOL_ERROR: u32 = 0x1;
pub(super) const REFUSED_STREAM: u32 = 0x7;
pub(super) const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Follows HTTP/2 frame boundaries in a byte stream and reports the error
/// code of every `RST_STREAM` and `GOAWAY` frame.
#[derive(Default)]
pub(super) struct FrameScanner {
    head: [u8; 9],
    head_len: usize,
    kind: u8,
    /// Payload bytes of the current frame still to come.
    remaining: usize,
    code: [u8; 8],
    code_len: usize,
    code_want: usize,
}

impl FrameScanner {
    pub(super) fn feed(&mut self, mut bytes: &[u8], report: &mut impl FnMut(u8, u32)) {
        while !bytes.is_empty() {
            if self.remaining == 0 {
                let (taken, rest) = bytes.split_at((9 - self.head_len).min(bytes.len()));
                let slots = self.head.iter_mut().skip(self.head_len);
                slots.zip(taken).for_each(|(slot, b)| *slot = *b);
                self.head_len += taken.len();
                bytes = rest;
                if self.head_len == 9 {
                    self.head_len = 0;
                    let [l0, l1, l2, kind, ..] = self.head;
                    self.remaining = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
                    self.kind = kind;
                    self.code_len = 0;
                    self.code_want = match self.kind {
                        FRAME_RST_STREAM => 4,
                        FRAME_GOAWAY => 8,
                        _ => 0,
                    };
                }
                continue;
            }
            let (payload, rest) = bytes.split_at(self.remaining.min(bytes.len()));
            if self.code_len < self.code_want {
                let slots = self
                    .code
                    .iter_mut()
                    .take(self.code_want)
                    .skip(self.code_len);
                let before = self.code_len;
                let copied = slots.zip(payload).map(|(slot, b)| *slot = *b).count();
                self.code_len = before + copied;
                if self.code_len == self.code_want {
                    // The error code is the payload's last 4 of its 4
                    // (RST_STREAM) or 8 (GOAWAY) leading bytes.
                    let [a0, a1, a2, a3, b0, b1, b2, b3] = self.code;
                    let code = if self.code_want == 8 {
                        [b0, b1, b2, b3]
                    } else {
                        [a0, a1, a2, a3]
                    };
                    report(self.kind, u32::from_be_bytes(code));
                }
            }
            self.remaining -= payload.len();
            bytes = rest;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0];
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    #[test]
    fn the_scanner_follows_frames_however_the_bytes_are_split() {
        let mut wire = Vec::new();
        wire.extend(frame(0x4, 0, &[0; 12])); // SETTINGS
        wire.extend(frame(0x1, 1, &[0x88; 40])); // HEADERS
        wire.extend(frame(FRAME_RST_STREAM, 3, &REFUSED_STREAM.to_be_bytes()));
        wire.extend(frame(0x0, 1, &[7; 1000])); // DATA
        wire.extend(frame(FRAME_RST_STREAM, 5, &PROTOCOL_ERROR.to_be_bytes()));
        let mut goaway = 5u32.to_be_bytes().to_vec();
        goaway.extend(ENHANCE_YOUR_CALM.to_be_bytes());
        goaway.extend(b"debug data");
        wire.extend(frame(FRAME_GOAWAY, 0, &goaway));
        let expected = vec![
            (FRAME_RST_STREAM, REFUSED_STREAM),
            (FRAME_RST_STREAM, PROTOCOL_ERROR),
            (FRAME_GOAWAY, ENHANCE_YOUR_CALM),
        ];
        for chunk in [1, 2, 3, 5, 8, 9, 10, 64, 4096] {
            let mut scanner = FrameScanner::default();
            let mut seen = Vec::new();
            for piece in wire.chunks(chunk) {
                scanner.feed(piece, &mut |k, c| seen.push((k, c)));
            }
            assert_eq!(seen, expected, "chunks of {chunk}");
        }
    }
}
