"""A small SYNTHETIC Korean spam/ham SMS set for the demo models, generated from templates.

THE DATA IS SYNTHETIC. Every message is a hand-written template with random slot fillers (URLs,
phone numbers, names, amounts, times). It exists so that ``scripts/run --demo`` has tiny models
that have learnt *something* and an honest held-out file to evaluate them on. The figures it
gives (accuracy, F1 on the held-out split) say nothing about real spam: real messages are far more
varied, and a model trained on these templates would do badly on them.

Design:

- 16 categories, 8 spam (광고, 대출, 도박, 피싱, 당첨, 쿠폰, 주식 리딩방, 택배 사칭) and 8 ham
  (약속, 회의, 가족, 택배 정상 안내, 병원 예약, 업무, 학교·학원, 안부), 4 templates each, and a
  fifth, short one for every spam category (no link) and for 약속 and 회의 (so length is no clue);
- 666 training messages, up to 12 distinct ones from each training template (fewer where a
  template has few slot combinations);
- the held-out split (``heldout.jsonl``, 169 messages) uses slot values never seen in training:
  every pool of names, places, shops, institutions, ... is split 3:1, and its URLs, phone and
  tracking numbers are drawn anew; it shares the training templates;
- the fourth template of every category is never used in training either: it makes a harder
  extra file, ``heldout_new_templates.jsonl`` (unseen wording as well as unseen values);
- some features appear in both classes on purpose (phone numbers, 택배, tracking numbers, times,
  a meeting link), and a third of the spam ends without its link or number, so a model cannot
  score on one of them alone;
- deterministic: the same seed gives the same messages, in the same order.

``python scripts/demo_data.py OUT`` writes ``train.jsonl``, ``heldout.jsonl``, ``heldout.csv`` and
``heldout_new_templates.jsonl`` to OUT: fields ``text`` and ``label`` (``spam`` or ``ham``), and in
the JSON lines also ``category`` and ``template`` (its index in the category).
"""

from __future__ import annotations

import csv
import json
import random
import string
import sys
from dataclasses import dataclass
from pathlib import Path

SEED = 20251129
TRAIN_PER_TEMPLATE = 12
HELDOUT_PER_TEMPLATE = 3
NEW_TEMPLATE_PER_TEMPLATE = 6
DROP_CONTACT = 0.35
HELDOUT_FILE = "heldout.jsonl"
NEW_TEMPLATES_FILE = "heldout_new_templates.jsonl"

# --- slot fillers ----------------------------------------------------------------------------------
# Lists are split by position: three of every four values are for training, the fourth is held out.

POOLS: dict[str, list[str]] = {
    "name": ["김민수", "이지은", "박서준", "최유진", "정하늘", "강동원", "윤서연", "장민호", "임수빈", "한지민",
             "오세훈", "서지우", "신예린", "권태양", "황보람", "송다은"],
    "relation": ["엄마", "아빠", "누나", "형", "언니", "오빠", "할머니", "동생"],
    "day": ["내일", "모레", "금요일", "이번 주 토요일", "다음 주 월요일", "수요일", "12월 3일", "이번 주말",
            "다음 주 화요일", "목요일", "일요일", "11월 28일"],
    "time": ["오후 3시", "오전 10시", "저녁 7시", "오후 2시 30분", "오전 9시", "점심 12시", "오후 6시", "저녁 8시 30분",
             "오전 11시", "오후 4시", "저녁 6시 30분", "오후 1시"],
    "place": ["강남역 11번 출구", "회사 앞 카페", "홍대입구역", "시청 앞", "학교 정문", "잠실역 8번 출구",
              "광화문 교보문고", "집 앞 편의점", "판교역", "신촌 로터리", "여의도 공원", "합정역 7번 출구"],
    "food": ["삼겹살", "파스타", "김치찌개", "초밥", "치킨", "떡볶이", "냉면", "쌀국수", "칼국수", "돈가스", "곱창",
             "피자"],
    "meeting": ["주간 회의", "프로젝트 회의", "팀 회의", "분기 보고", "디자인 리뷰", "예산 회의", "신규 입사자 교육",
                "고객사 미팅"],
    "room": ["3층 대회의실", "2층 소회의실", "본관 301호", "온라인", "7층 회의실 B", "별관 세미나실", "10층 라운지",
             "5층 회의실 A"],
    "doc": ["회의록", "견적서", "보고서 초안", "발표 자료", "계약서", "주간 일정표", "예산안", "기획안"],
    "courier": ["CJ대한통운", "우체국택배", "한진택배", "롯데택배"],
    "item": ["운동화", "책 두 권", "노트북 거치대", "겨울 코트", "커피 원두", "휴대폰 케이스", "전기포트", "이불",
             "블루투스 이어폰", "아기 옷", "화장품 세트", "캠핑 의자"],
    "hospital": ["서울내과", "행복치과", "연세정형외과", "밝은안과", "우리소아과", "튼튼재활의학과", "맑은이비인후과",
                 "가온피부과"],
    "school": ["수학학원", "영어학원", "피아노학원", "태권도장", "중앙초등학교", "미술학원", "한빛중학교", "코딩학원"],
    "shop": ["명품아울렛", "쇼핑몰 해피딜", "베스트마트", "스마일몰", "럭키샵", "오늘특가몰", "프라임스토어",
             "굿초이스몰"],
    "product": ["다이어트 보조제", "홍삼 세트", "안마의자", "명품 가방", "건강기능식품", "무선 청소기", "정수기",
                "골프 용품"],
    "bank": ["서민금융지원센터", "KB저축은행 상담팀", "정부지원 대출센터", "신한캐피탈 상담실", "햇살론 접수처",
             "하나저축 상담팀", "국민행복대출 센터", "우리캐피탈 상담실"],
    "casino": ["로얄카지노", "베팅365", "스포츠토토 VIP", "바카라클럽", "슬롯킹", "라이브카지노", "토토왕", "황금성"],
    "prize": ["아이폰 16", "백화점 상품권 50만원", "에어팟 프로", "갤럭시 탭", "현금 100만원", "제주도 여행권",
              "명품 시계", "주유권 30만원"],
    "stock": ["2차전지 테마주", "AI 반도체주", "바이오 신약주", "코인 신규 상장", "급등 예정 종목", "우주항공 테마주",
              "로봇 관련주", "세력주"],
    "institution": ["검찰청", "금융감독원", "국민건강보험공단", "경찰청 사이버수사대", "국세청", "카드사 보안팀",
                    "KB국민은행 보안센터", "우체국 금융센터"],
}

_TLDS = [".com", ".kr", ".xyz", ".top", ".net", ".me", ".co", ".shop"]
_SHORTENERS = ["bit.ly", "han.gl", "me2.do", "url.kr", "vo.la", "t.ly"]


@dataclass(frozen=True)
class Slots:
    """Slot values for one split: its share of each pool, plus generated URLs and numbers."""

    rng: random.Random
    held_out: bool

    def pick(self, pool: str) -> str:
        values = [v for i, v in enumerate(POOLS[pool]) if (i % 4 == 3) == self.held_out]
        return self.rng.choice(values)

    def url(self) -> str:
        r = self.rng
        if r.random() < 0.4:
            return f"{r.choice(_SHORTENERS)}/{''.join(r.choices(string.ascii_letters + string.digits, k=6))}"
        host = "".join(r.choices(string.ascii_lowercase, k=r.randint(4, 8))) + r.choice(_TLDS)
        path = "/" + "".join(r.choices(string.ascii_lowercase + string.digits, k=r.randint(3, 6)))
        return f"{r.choice(['http://', 'https://', ''])}{host}{path if r.random() < 0.6 else ''}"

    def phone(self) -> str:
        r = self.rng
        kind = r.randint(0, 3)
        if kind == 0:
            return f"010-{r.randint(1000, 9999)}-{r.randint(1000, 9999)}"
        if kind == 1:
            return f"070-{r.randint(1000, 9999)}-{r.randint(1000, 9999)}"
        if kind == 2:
            return f"1{r.choice(['588', '577', '644', '899'])}-{r.randint(1000, 9999)}"
        return f"02-{r.randint(100, 999)}-{r.randint(1000, 9999)}"

    def fill(self, key: str) -> str:
        r = self.rng
        if key == "url":
            return self.url()
        if key == "phone":
            return self.phone()
        if key == "optout":
            return f"080-{r.randint(100, 999)}-{r.randint(1000, 9999)}"
        if key == "money":
            return r.choice([f"{r.randint(3, 9)}천만원", f"{r.randint(1, 5)}억", f"{r.randint(3, 9)}00만원"])
        if key == "rate":
            return f"{r.randint(2, 9)}.{r.randint(0, 9)}%"
        if key == "pct":
            return f"{r.choice([30, 40, 50, 60, 70, 80, 90])}%"
        if key == "won":
            return f"{r.randint(1, 99) * 1000:,}원"
        if key == "tracking":
            return "".join(r.choices(string.digits, k=12))
        if key == "code":
            return "".join(r.choices(string.ascii_uppercase + string.digits, k=6))
        if key == "num":
            return str(r.randint(2, 9))
        return self.pick(key)


# --- templates -------------------------------------------------------------------------------------
# Four or five per category; the last one of each is never used in training.

SPAM: dict[str, list[str]] = {
    "광고": [
        "(광고) {product} 오늘만 {pct} 할인",
        "(광고) {shop} 창고 대방출 최대 {pct} 할인! 오늘만 {url} 무료거부 {optout}",
        "[광고] {product} 특가 {won}, 선착순 {num}0명 한정 구매하기 {url}",
        "(광고){shop} 회원님께만 드리는 {product} 1+1 이벤트 지금 확인 {url} 수신거부 {optout}",
        "[Web발신] (광고) {product} 체험단 모집! 무료로 받아보세요 신청 {url} 거부 {optout}",
    ],
    "대출": [
        "{money} 대출 승인 완료 연락 주세요",
        "{bank}입니다. 고객님 {money} 한도 승인 완료, 금리 {rate} 당일 입금 가능 {phone}",
        "[{bank}] 신용등급 상관없이 최대 {money} 대출 가능합니다. 상담 {phone}",
        "정부지원 저금리 대환대출 대상자로 선정되셨습니다 {money}까지 금리 {rate} 신청 {url}",
        "무직자 주부 대학생 누구나 {money} 비대면 대출! 당일 승인 문의 {phone}",
    ],
    "도박": [
        "{casino} 첫충 {pct} 지금 가입하세요",
        "{casino} 신규가입 첫충 {pct} 보너스 지급! 주소 {url} 코드 {code}",
        "[{casino}] 매일 이벤트 먹튀 없는 안전놀이터 입금 즉시 {pct} 추가 {url}",
        "오늘 밤 경기 적중률 {pct} 픽 무료 제공 {casino} 가입코드 {code} {url}",
        "{casino} VIP 초대장 도착! 첫 입금 {won} 이상 시 {pct} 페이백 바로가기 {url}",
    ],
    "피싱": [
        "[{institution}] 본인 확인이 필요합니다 지금 확인하세요",
        "[{institution}] 고객님 명의가 범죄에 도용되었습니다. 즉시 확인 바랍니다 {phone}",
        "[{institution}] 미납된 요금이 있어 계좌가 정지될 예정입니다. 본인 확인 {url}",
        "엄마 나 폰 액정 깨져서 임시폰이야 급하게 {won} 보내줄 수 있어? 이 번호로 문자줘 {phone}",
        "[{institution}] 해외 결제 {won} 승인되었습니다. 본인이 아닐 경우 즉시 신고 {url}",
    ],
    "당첨": [
        "축하합니다 {prize} 당첨! 지금 확인하세요",
        "축하합니다! {prize} 이벤트에 당첨되셨습니다. 수령 정보 입력 {url}",
        "[당첨안내] 고객님은 {prize} 경품 추첨에 당첨! {day}까지 확인하세요 {url}",
        "고객 감사 이벤트 1등 당첨 {prize} 지급 예정, 배송비 {won} 결제 후 수령 {url}",
        "[Web발신] 축하드립니다 {prize} 당첨자로 선정되셨습니다 본인 인증 후 수령 {url}",
    ],
    "쿠폰": [
        "무료 {won} 쿠폰 당첨! 지금 받으세요",
        "[{shop}] {won} 할인쿠폰이 발급되었습니다. 오늘 자정 소멸! 사용하기 {url}",
        "축하합니다 무료 쿠폰 당첨! 바로 아래 링크 눌러서 받으세요 {url}",
        "{shop} 앱 설치만 해도 {won} 쿠폰 즉시 지급 코드 {code} {url}",
        "(광고) 쿠폰 {pct} 할인 마지막 기회! {shop} 전 상품 적용 {url}",
    ],
    "주식 리딩방": [
        "{stock} 무료 추천 지금 입장하세요",
        "[VIP 리딩방] {stock} 무료 추천 수익률 {pct} 보장 카톡 입장 {url}",
        "이번 주 {stock} 급등 예정! 무료 리딩방 선착순 {num}0명 {url}",
        "전문가 무료 종목 추천 {stock} 한 달 수익 {pct} 상담 {phone}",
        "세력 매집 포착 {stock} 내일 상한가 예상 지금 입장하세요 {url}",
    ],
    "택배 사칭": [
        "[{courier}] 배송 보류, 주소를 확인하세요",
        "[{courier}] 주소지 불일치로 배송이 보류되었습니다. 주소 수정 {url}",
        "[국제발신] 고객님 택배가 반송 처리되었습니다 재배송 신청 {url}",
        "[{courier}] 운송장 {tracking} 통관 보류, 관세 {won} 납부 후 배송 {url}",
        "택배 보관기간 만료 예정, 주소 확인 안되면 폐기됩니다 확인하기 {url}",
    ],
}

HAM: dict[str, list[str]] = {
    "약속": [
        "{day} {time}에 보자",
        "{day} {time}에 {place}에서 만나자",
        "{name}아 {day} 저녁에 {food} 먹을래? {time} 어때",
        "나 {place} 도착했어 천천히 와",
        "{day} 약속 {time}으로 미뤄도 될까? {place} 근처에서 보자",
    ],
    "회의": [
        "{day} {meeting}는 {time}입니다",
        "{day} {meeting}는 {time}에 {room}에서 진행합니다",
        "{meeting} 시간이 {day} {time}으로 변경되었습니다 참고 부탁드립니다",
        "{meeting} 온라인 링크 공유드립니다 {url} {time} 시작이에요",
        "{day} {meeting} 안건 정리해서 {time} 전까지 공유해 주세요",
    ],
    "가족": [
        "{relation} 오늘 저녁 {food} 먹을까?",
        "{relation} 나 {time}쯤 집에 도착해",
        "{relation} {day}에 할머니 댁 가는 거 잊지 마",
        "{relation} 장 보러 가는데 {food} 재료 사 갈까?",
    ],
    "택배 정상 안내": [
        "[{courier}] 고객님의 상품({item})이 {day} {time}에 배송될 예정입니다. 운송장 {tracking}",
        "[{courier}] 주문하신 {item} 배송이 완료되었습니다. 문 앞에 두었습니다",
        "{courier} 기사입니다 {item} 경비실에 맡겨두었습니다 {phone}",
        "[{courier}] {item} 상품이 집하되었습니다 운송장번호 {tracking}",
    ],
    "병원 예약": [
        "[{hospital}] {name}님 {day} {time} 진료 예약되었습니다. 변경 문의 {phone}",
        "[{hospital}] 내일 {time} 예약 잊지 마세요. 10분 전까지 내원 부탁드립니다",
        "[{hospital}] 검사 결과가 나왔습니다. {day}에 내원해 주세요 문의 {phone}",
        "[{hospital}] {name}님 {day} {time} 예약이 취소되었습니다. 재예약은 {phone}",
    ],
    "업무": [
        "{doc} 검토 부탁드립니다 {day}까지 회신 주세요",
        "{name}님 요청하신 {doc} 메일로 보내드렸습니다",
        "오늘 {time}까지 {doc} 마감입니다 확인 부탁드려요",
        "{doc} 수정본 공유드립니다 {day} {meeting} 전에 한번 봐주세요",
    ],
    "학교·학원": [
        "[{school}] {day} 수업은 {time}에 시작합니다",
        "[{school}] 이번 달 수강료 안내드립니다 문의 {phone}",
        "[{school}] {name} 학생 오늘 {time}에 하원했습니다",
        "[{school}] {day}은 휴원입니다 보강 일정은 따로 안내드리겠습니다",
    ],
    "안부": [
        "{name}아 잘 지내? 요즘 많이 바쁘지",
        "생일 축하해 {name}아 {day}에 {food} 사줄게",
        "{name}님 오늘 고생 많으셨습니다 푹 쉬세요",
        "오랜만이야 {name}아 {day}에 시간 되면 연락해",
    ],
}


@dataclass(frozen=True)
class Example:
    text: str
    label: str  # "spam" or "ham"
    category: str
    template: int

    def record(self) -> dict:
        return {"text": self.text, "label": self.label, "category": self.category, "template": self.template}


def _fill(template: str, slots: Slots) -> str:
    out, rest = [], template
    while "{" in rest:
        head, _, tail = rest.partition("{")
        key, _, rest = tail.partition("}")
        out += [head, slots.fill(key)]
    return "".join(out) + rest


def _generate(split: str, per_template: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[Example]:
    rng = random.Random(f"{seed}-{split}")
    slots = Slots(rng, held_out=split != "train")
    examples: list[Example] = []
    seen: set[str] = set(exclude)  # a held-out message is never a training one, even by chance
    for label, table in (("spam", SPAM), ("ham", HAM)):
        for category, templates in table.items():
            ids = [len(templates) - 1] if split == "new-templates" else range(len(templates) - 1)
            for t in ids:
                made = 0
                for _ in range(per_template * 20):
                    template = templates[t]
                    # A third of the spam goes without its closing link or number, so that a model
                    # has to read the words, not just spot a URL.
                    if label == "spam" and template.endswith(("{url}", "{phone}")) and rng.random() < DROP_CONTACT:
                        template = template.rsplit(" ", 1)[0]
                    text = _fill(template, slots)
                    if text in seen:
                        continue
                    seen.add(text)
                    examples.append(Example(text, label, category, t))
                    made += 1
                    if made == per_template:
                        break
    rng.shuffle(examples)
    return examples


def build(seed: int = SEED) -> tuple[list[Example], list[Example]]:
    """The training and held-out splits: the same templates, disjoint slot values."""
    train = _generate("train", TRAIN_PER_TEMPLATE, seed)
    heldout = _generate("heldout", HELDOUT_PER_TEMPLATE, seed, frozenset(e.text for e in train))
    assert not {e.text for e in train} & {e.text for e in heldout}
    return train, heldout


def new_templates(seed: int = SEED) -> list[Example]:
    """A harder extra split: templates never used in training, filled with held-out slot values."""
    return _generate("new-templates", NEW_TEMPLATE_PER_TEMPLATE, seed)  # templates unseen: no overlap


def lexicon() -> list[str]:
    """Every slot value of both splits, unlabelled: stands in for the general text a real tokenizer
    is trained on, so held-out names and places are words to the tokenizers, not [UNK] or bytes."""
    return [v for pool in POOLS.values() for v in pool]


def write(out: Path, seed: int = SEED) -> tuple[list[Example], list[Example]]:
    """Write ``train.jsonl``, ``heldout.jsonl``, ``heldout.csv`` and ``heldout_new_templates.jsonl``
    to ``out``; return the training and held-out splits."""
    train, heldout = build(seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, examples in (("train", train), ("heldout", heldout), ("heldout_new_templates", new_templates(seed))):
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for e in examples:
                f.write(json.dumps(e.record(), ensure_ascii=False) + "\n")
    with (out / "heldout.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([e.text, e.label] for e in heldout)
    return train, heldout


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/demo-models/data")
    tr, ho = write(target)
    print(f"{len(tr)} training and {len(ho)} held-out messages (synthetic) in {target}", file=sys.stderr)
