"""The Kuaishou event catalog: every ``event_type`` the conversion API accepts, in one table.

Validation, the ``/api/v1/event-types`` listing, the README's event table and the set of events a
browser may report are all derived from ``EVENT_TYPES``; nothing else lists event types.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

# Parameters that carry money, in yuan with two decimals.
AMOUNT = "purchase_amount"

# Every optional Kuaishou parameter besides callback, event_type and event_time.
KUAISHOU_PARAMETERS = (
    AMOUNT,
    "user_tags_age",
    "ext_pred_ltv",
    "ext_pred_pay_ratio",
    "pay_level",
    "novel_chapter_num",
    "key_action_category",
    "key_action_threshold",
    "action_reason",
    "server_type",
    "connection_server",
)

# Allowed on every event: the spec lists the insurance age tag without tying it to an event.
COMMON_PARAMETERS = frozenset({"user_tags_age"})


@dataclass(frozen=True)
class EventType:
    """One row of Kuaishou's event table, plus how this product treats it."""

    code: int
    name: str
    label: str
    industry: str
    required: frozenset[str] = frozenset()
    optional: frozenset[str] = frozenset()
    browser: bool = False
    note: str = ""

    @property
    def allowed(self) -> frozenset[str]:
        return self.required | self.optional | COMMON_PARAMETERS

    def to_json(self, once_per_callback: frozenset[int]) -> dict:
        return {
            "code": self.code,
            "name": self.name,
            "label": self.label,
            "industry": self.industry,
            "required_params": sorted(self.required),
            "optional_params": sorted(self.allowed - self.required),
            "once_per_callback": self.code in once_per_callback,
            "browser": self.browser,
            "note": self.note,
        }


def _event(
    code: int,
    name: str,
    label: str,
    industry: str = "any",
    *,
    required: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
    browser: bool = False,
    note: str = "",
) -> EventType:
    return EventType(
        code, name, label, industry, frozenset(required), frozenset(optional), browser, note
    )


_MONEY = (AMOUNT,)
_CONSULTING = "franchising, home & building materials, local services, education"
_NOVEL_PARAMS = ("novel_chapter_num", "pay_level", AMOUNT)
# Kuaishou's document swaps these parameters between 150 and 151; both events take all of them.
_NOVEL_NOTE = "novel_chapter_num 1-1000, pay_level S/M/L and purchase_amount, none required"

EVENT_TYPES: tuple[EventType, ...] = (
    _event(1, "activation", "Activation"),
    _event(2, "registration", "Registration", note="first registration only"),
    _event(3, "payment", "Payment", required=_MONEY, note="may repeat per payment"),
    _event(5, "app_active", "Active (app opened)", note="each time the app is opened"),
    _event(6, "quality_user", "Quality user", note="advertiser-defined"),
    _event(7, "next_day_retention", "Next-day retention"),
    _event(8, "seven_day_retention", "7-day retention"),
    _event(9, "form", "Form submitted", browser=True, note="H5 landing-page forms"),
    _event(11, "credit_granted", "Credit granted", "finance", required=_MONEY),
    _event(12, "product_view", "Product viewed", "e-commerce", required=_MONEY),
    _event(13, "add_to_cart", "Added to cart", "e-commerce", required=_MONEY),
    _event(14, "order_submitted", "Order submitted", "e-commerce", required=_MONEY),
    _event(15, "order_paid", "Order paid", "e-commerce", required=_MONEY),
    _event(43, "trial_class_attended", "Trial class attended", "education"),
    _event(44, "valid_lead", "Valid lead"),
    _event(51, "payment_page_view", "Payment page viewed", browser=True),
    _event(64, "wechat_copy", "WeChat ID copied", browser=True),
    _event(69, "full_price_course_paid", "Full-price course paid (education)", optional=_MONEY),
    _event(84, "app_invoked", "App invoked", note="only invocations from a Kuaishou ad click"),
    _event(109, "sim_activated", "SIM card activated", "IT / consumer electronics"),
    _event(116, "phone_contact", "Phone contact made", _CONSULTING),
    _event(117, "intent_confirmed", "Intent confirmed", _CONSULTING),
    _event(118, "wechat_friend_added", "WeChat friend added", _CONSULTING),
    _event(119, "deal", "Deal closed", _CONSULTING),
    _event(
        120,
        "phone_contact_failed",
        "Phone contact failed",
        _CONSULTING,
        optional=("action_reason",),
        note="action_reason 1 suspended, 2 not in service, 3 phone off, 4 rejected, 5 no answer",
    ),
    _event(
        121,
        "not_interested",
        "User not interested",
        _CONSULTING,
        optional=("action_reason",),
        note="action_reason 1 not submitted by user, 2 someone else answered, "
        "3 cannot afford, 4 no longer wants, 5 out of scope",
    ),
    _event(
        138,
        "wechat_qr_click",
        "WeChat QR-code link clicked",
        "mini-program advertisers",
        browser=True,
    ),
    _event(139, "trial_class_completed", "Trial class completed", "education"),
    _event(140, "second_trial_class", "Second trial class attended", "education"),
    _event(141, "all_trial_classes_completed", "All trial classes completed", "education"),
    _event(
        143,
        "key_action",
        "Key action",
        "games",
        optional=("key_action_category", "key_action_threshold"),
        note="send key_action_category and key_action_threshold",
    ),
    _event(
        150,
        "payer_tier_payment",
        "Large/small payer payment",
        "novels",
        optional=_NOVEL_PARAMS,
        note=_NOVEL_NOTE,
    ),
    _event(
        151,
        "novel_chapters_read",
        "Novel chapters read",
        "novels",
        optional=_NOVEL_PARAMS,
        note=_NOVEL_NOTE,
    ),
    _event(152, "passenger_first_order", "Passenger placed first order", "ride-hailing"),
    _event(153, "passenger_first_ride", "Passenger completed first ride", "ride-hailing"),
    _event(154, "driver_verification_submitted", "Driver submitted verification", "ride-hailing"),
    _event(155, "driver_verification_approved", "Driver verification approved", "ride-hailing"),
    _event(156, "driver_first_ride", "Driver completed first ride", "ride-hailing"),
    _event(
        157,
        "external_prediction",
        "External predicted values",
        optional=("ext_pred_ltv", "ext_pred_pay_ratio"),
    ),
    _event(179, "miniprogram_entered", "Mini-program entered", browser=True),
    _event(
        181,
        "next_day_retention_24h",
        "Next-day retention, 24-hour window",
        note="must be enabled for the account; distinct from 7",
    ),
    _event(
        182,
        "game_server_entered",
        "User entered game server",
        "games",
        optional=("server_type", "connection_server"),
        note="server_type required with connection_server",
    ),
)

BY_CODE: dict[int, EventType] = {event.code: event for event in EVENT_TYPES}
BY_NAME: dict[str, EventType] = {event.name: event for event in EVENT_TYPES}

# The tag's own signal that a click id was captured; stored, never relayed to Kuaishou.
LANDING = "landing"


def lookup(value: object) -> EventType | None:
    """Find an event type by its code (``9``, ``"9"``) or catalog name (``"form"``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return BY_CODE.get(value)
    if isinstance(value, str):
        text = value.strip()
        # ASCII only: int() would also read "²" or "٩" and str.isdigit() lets them through.
        if text.isascii() and text.isdigit() and len(text) <= 4:
            return BY_CODE.get(int(text))
        return BY_NAME.get(text.lower())
    return None


def browser_events() -> tuple[EventType, ...]:
    """The event types the tag may report from a landing page; the rest are server-only."""
    return tuple(event for event in EVENT_TYPES if event.browser)


# ---------------------------------------------------------------------------------------------
# The README's event table


# First line of the generated table, so nobody edits the copy in the README by hand.
MARKDOWN_BANNER = (
    "<!-- Generated by `python -m collector.catalog --markdown` from collector/catalog.py;"
    " edit the catalog, not this table. -->"
)


def _code_list(names: frozenset[str]) -> str:
    return ", ".join(f"`{name}`" for name in sorted(names))


def markdown_table(once_per_callback: frozenset[int] | None = None) -> str:
    """The event table of the README and docs/event-catalog.md, as Markdown.

    "Once per click" shows ``once_per_callback``, by default the default of
    ``KS_COLLECTOR_ONCE_PER_CALLBACK``, so the published table never depends on a machine's
    environment.
    """
    from .config import DEFAULT_ONCE_PER_CALLBACK

    if once_per_callback is None:
        once_per_callback = frozenset(int(code) for code in DEFAULT_ONCE_PER_CALLBACK.split(","))
    lines = [
        MARKDOWN_BANNER,
        "",
        "| code | name | label | industry | required | optional | once per click | browser |",
        "| ---: | --- | --- | --- | --- | --- | :---: | :---: |",
    ]
    for event in EVENT_TYPES:
        cells = (
            str(event.code),
            f"`{event.name}`",
            event.label,
            event.industry,
            _code_list(event.required),
            _code_list(event.optional),
            "yes" if event.code in once_per_callback else "",
            "yes" if event.browser else "",
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Every event also accepts {_code_list(COMMON_PARAMETERS)} (the insurance industry's"
        " age tag). *Once per click*: relayed at most once per click id, whether it comes from"
        " the tag, the API or the CLI (the default of `KS_COLLECTOR_ONCE_PER_CALLBACK`,"
        f" `{','.join(str(code) for code in sorted(once_per_callback))}`). *Browser*: the tag"
        " may report it from a landing page; every other event is accepted only from your"
        " servers, through `POST /api/v1/conversions` or `ks-collector send`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m collector.catalog --markdown``: print the event table."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m collector.catalog", description="Print the Kuaishou event catalog."
    )
    parser.add_argument(
        "--markdown", action="store_true", help="the README's table (docs/event-catalog.md)"
    )
    args = parser.parse_args(argv)
    if not args.markdown:
        parser.error("say which format: --markdown")
    sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
