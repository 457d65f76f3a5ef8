"""Files as people save them: Excel's "CSV UTF-8" (a byte-order mark, CRLF line ends) and the label
spellings people use, read the same way by ``batch`` and ``evaluate``."""

from __future__ import annotations

import json

from producer.evaluate import scan
from producer.files import count_records, read_labeled, read_texts

ROWS = [("무료 쿠폰 당첨! 지금 클릭", "1"), ("내일 회의는 3시입니다", "0"), ("대출 승인, 연락 주세요", "spam"),
        ("엄마 저녁 먹어요", "Ham"), ("[광고] 최저가 \"할인\"", "스팸"), ("택배\r\n도착했습니다", "정상"),
        ("Congratulations you won", "TRUE"), ("See you at lunch", "false")]
SPAM = [True, False, True, False, True, False, True, False]


def excel_csv(path, rows=ROWS) -> None:
    """What Excel writes for "CSV UTF-8": a BOM, CRLF after every record, quotes where needed."""
    lines = ["text,label"] + [f'"{t.replace(chr(34), chr(34) * 2)}",{y}' for t, y in rows]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")


def test_an_excel_csv_reads_its_header_texts_and_labels(tmp_path):
    path = tmp_path / "labeled.csv"
    excel_csv(path)
    assert list(read_texts(path, "csv")) == [t for t, _ in ROWS]  # the BOM is not part of the column name
    assert count_records(path, "csv") == len(ROWS)
    assert list(read_labeled(path, "csv")) == list(zip([t for t, _ in ROWS], SPAM, strict=True))
    assert list(scan(path).y) == [int(s) for s in SPAM]


def test_a_bom_and_crlf_in_jsonl_and_text_files(tmp_path):
    path = tmp_path / "labeled.jsonl"
    lines = [json.dumps({"text": t, "label": y}, ensure_ascii=False) for t, y in ROWS]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    assert list(read_labeled(path, "jsonl")) == list(zip([t for t, _ in ROWS], SPAM, strict=True))
    text = tmp_path / "messages.txt"
    text.write_bytes(b"\xef\xbb\xbf" + "첫 줄\r\n둘째 줄\r\n".encode())
    assert list(read_texts(text, "txt")) == ["첫 줄", "둘째 줄"]
