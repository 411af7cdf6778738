"""all_objects: the whole-batch check says True only when body_error,
line by line, finds every line a JSON object; on the rest the line-by-line
pass decides, so the batch verdict is the same either way."""

from __future__ import annotations

import random

from twisted.trial import unittest

from estat.validate import all_objects, body_error, is_utf8, strict_body_error

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


class AllObjectsTests(unittest.TestCase):
    def test_agrees_with_body_error_line_by_line(self):
        rng = random.Random(7)
        pool = GOOD + BAD
        for _ in range(3000):
            lines = [rng.choice(pool) for _ in range(rng.randint(1, 6))]
            every_object = all(body_error(line) is None for line in lines)
            if all_objects(lines):
                self.assertTrue(every_object, lines)
            elif every_object:
                # allowed only where the fast check is stricter than RFC
                # 8259: a lone surrogate escape, whitespace around the object
                self.assertTrue(any(b"\\ud800" in line or line != line.strip()
                                    for line in lines), lines)

    def test_the_common_batch_passes_whole(self):
        self.assertTrue(all_objects([b'{"n":%d}' % n for n in range(100)]))
        self.assertTrue(all_objects(GOOD[:5]))
        self.assertFalse(all_objects([]))

    def test_a_long_batch_is_decided_slice_by_slice_whole(self):
        # Longer than one decode's slice: every slice must pass, and a pair
        # of lines that read as objects only when joined fails wherever the
        # slices are cut.
        lines = [b'{"n":%d}' % n for n in range(2500)]
        self.assertTrue(all_objects(lines))
        for at in (0, 999, 1000, 1700, 2499):
            broken = list(lines)
            broken[at] = b'{"n":NaN}'
            self.assertFalse(all_objects(broken), at)
        for at in (998, 999, 1000):
            straddling = list(lines)
            straddling[at:at + 2] = [b'{"a":"', b'","b":1},{"c":2}']
            self.assertFalse(all_objects(straddling), at)

    def test_is_utf8(self):
        self.assertTrue(is_utf8(b"ascii"))
        self.assertTrue(is_utf8("café".encode()))
        self.assertFalse(is_utf8(b"\xff"))
        self.assertFalse(is_utf8(b"\xed\xa0\x80"))  # an encoded surrogate
