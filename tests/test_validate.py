"""lines_are_objects: the whole-batch check says True only when body_error,
line by line, finds every line a JSON object; on the rest the line-by-line
pass decides, so the batch verdict is the same either way."""

from __future__ import annotations

import random

from twisted.trial import unittest

from estat.validate import body_error, is_utf8, lines_are_objects, strict_body_error

GOOD = [b'{"a":1}', b'{}', b'{"s":"caf\xc3\xa9","n":[1,2.5e3,{"x":null}]}',
        b'{"deep":' + b"[" * 200 + b"]" * 200 + b"}", b'{"big":1e999}', b'{"t":true,"f":false}']
BAD = [b"", b"  ", b"1", b'"s"', b"[]", b'{"a":1}{"b":2}', b'{"a":1},{"b":2}', b'{"a":NaN}',
       b'{"a":Infinity}', b'{"a":"\xff"}', b'{"a":"\xed\xa0\x80"}', b'{"a":1,}', b' {"a":1}',
       b'{"a":1} ', b'{"a":"x\ty"}', b'{"a":01}', b"{", b'{"a":1', b'{"lone":"\\ud800"}',
       b'{"deep":' + b"[" * 5000 + b"]" * 5000 + b"}",
       # two lines that, joined by a comma, read as two whole objects
       b'{"a":"', b'","b":1},{"c":2}']


class BodyErrorTests(unittest.TestCase):
    def test_the_fast_scan_gives_the_strict_verdict(self):
        """Objects with nothing around them are decided by msgspec's scan;
        every verdict, that one's or the fallbacks', is the stdlib's."""
        for body in GOOD + BAD + [b'{"a":"x\ty"}x', b'{"a":1}\n', b'{"a":[1,}']:
            self.assertEqual(body_error(body), strict_body_error(body), body)


def text_of(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def all_objects(lines: list[bytes], max_line_bytes: int = 1 << 20) -> bool:
    return lines_are_objects(text_of(lines), len(lines), max_line_bytes)


class LinesAreObjectsTests(unittest.TestCase):
    def test_agrees_with_body_error_line_by_line(self):
        rng = random.Random(7)
        pool = GOOD + BAD
        for _ in range(3000):
            lines = [rng.choice(pool) for _ in range(rng.randint(1, 6))]
            every_object = all(body_error(line) is None for line in lines)
            self.assertEqual(all_objects(lines), every_object, lines)

    def test_the_common_batch_passes_whole(self):
        self.assertTrue(all_objects([b'{"n":%d}' % n for n in range(100)]))
        self.assertTrue(all_objects(GOOD[:5]))
        self.assertTrue(all_objects([b' {"a":1}', b'{"a":1}\t']))  # RFC 8259 whitespace

    def test_no_value_runs_past_its_line(self):
        # Texts whose values, read as a stream, would each be whole
        # objects, or as many as the lines, if a value could cross a LF.
        for text, count in [(b'{"a":\n1}\n', 2), (b'{"a":1}{"b":2}\n\n', 2),
                            (b'{"a":"}\n{"}\n', 2), (b'{"a":1}][{"b":2}\n{"c":[\n1]}\n', 3),
                            (b'\n{"a":1}\n', 2), (b'{"a":1}\n \n', 2),
                            (b'{"a":1},{"b":1}\n', 1), (b'{"a":[1,\n{"b":2}]}\n', 2)]:
            self.assertFalse(lines_are_objects(text, count, 1 << 20), text)

    def test_the_count_must_be_the_lines(self):
        text = text_of([b'{"n":%d}' % n for n in range(10)])
        self.assertTrue(lines_are_objects(text, 10, 100))
        self.assertFalse(lines_are_objects(text, 9, 100))
        self.assertFalse(lines_are_objects(text, 11, 100))
        self.assertFalse(lines_are_objects(text[:-1], 10, 100), "the last line needs its LF")
        self.assertFalse(lines_are_objects(b"", 0, 100))

    def test_a_line_over_the_limit_fails_wherever_it_is(self):
        for limit in (9, 10, 64, 1000):
            for long_at in (0, 3, 49):
                lines = [b'{"n":%d}' % (n % 10) for n in range(50)]  # 7 bytes each
                self.assertTrue(all_objects(lines, limit), limit)
                lines[long_at] = b'{"s":"' + b"x" * (limit - 7) + b'"}'  # limit + 1 bytes
                self.assertFalse(all_objects(lines, limit), (limit, long_at))
                lines[long_at] = lines[long_at][:6] + lines[long_at][7:]  # limit bytes
                self.assertTrue(all_objects(lines, limit), (limit, long_at))

    def test_is_utf8(self):
        self.assertTrue(is_utf8(b"ascii"))
        self.assertTrue(is_utf8("café".encode()))
        self.assertFalse(is_utf8(b"\xff"))
        self.assertFalse(is_utf8(b"\xed\xa0\x80"))  # an encoded surrogate


class LinesAreObjectsSliceTests(unittest.TestCase):
    def test_a_text_longer_than_a_slice_is_decided_whole(self):
        # Decoded a slice of lines at a time: every slice must pass, and a
        # pair of lines that read as objects only when joined fails
        # wherever the slices are cut.
        from estat import validate

        self.patch(validate, "_DECODE_SLICE_BYTES", 64)
        lines = [b'{"n":%d}' % n for n in range(300)]
        self.assertTrue(all_objects(lines))
        self.assertFalse(lines_are_objects(text_of(lines), 299, 1000))
        for at in (0, 7, 8, 150, 299):
            broken = list(lines)
            broken[at] = b'{"n":NaN}'
            self.assertFalse(all_objects(broken), at)
        for at in range(0, 20):
            straddling = list(lines)
            straddling[at:at + 2] = [b'{"a":', b'1}']
            self.assertFalse(all_objects(straddling), at)
            straddling[at:at + 2] = [b'{"a":"\xc3', b'\xa9"}']  # a character cut by a LF
            self.assertFalse(all_objects(straddling), at)


class LinesAreObjectsFuzz(unittest.TestCase):
    def test_true_only_when_every_line_is_an_object(self):
        """Texts made of JSON's structural characters and line ends, in any
        order: whenever the whole-text check says yes, each line on its own
        is one JSON object by the strict decoder (and it does say yes to
        hundreds of them)."""
        tokens = [b"{", b"}", b"[", b"]", b'"', b",", b":", b" ", b"1", b'"a"', b"\\",
                  b"\n", b'{"a":1}', b"null"]
        rng = random.Random(11)
        accepted = 0
        for _ in range(60_000):
            text = b"".join(rng.choice(tokens) for _ in range(rng.randint(0, 24)))
            if not text.endswith(b"\n"):
                text += b"\n"
            lines = text.split(b"\n")[:-1]
            if lines_are_objects(text, len(lines), 1 << 20):
                accepted += 1
                for line in lines:
                    self.assertIsNone(strict_body_error(line), (text, line))
        self.assertGreater(accepted, 100)
