"""Personal data: hand-made matches of each kind, the look-alikes that must not match, and the three modes."""
import pytest

from llm_jax.data.prepare import privacy

PHONES = ["+1 (555) 123-4567", "555-123-4567", "(555) 123-4567", "555.123.4567", "1-800-555-0199",
          "+44 20 7946 0958", "+44 (0)20 7946 0958", "020 7946 0958", "+49 30 1234567", "030 1234567",
          "+33 1 23 45 67 89", "01 23 45 67 89", "06.12.34.56.78", "+15551234567", "612 345 678"]
NOT_PHONES = ["in 2023", "on 2024-03-15 at noon", "15.03.2024", "03/15/2024", "the years 1999-2004",
              "1999 - 2004", "version 10.0.19041.1234", "v2.14.1", "order 12345678901234", "pi is 3.14159265",
              "population 12.345.678", "cost 100 000 000 euro", "ISBN 978-3-16-148410-0",
              "card 4111 1111 1111 1111", "at 10:30:45", "2023-01-15 10:30", "pages 12-15", "won 3-2",
              "1 000 000 people", "id 1234567", "release v10.20.30.40", "scores 12 15 18 21 24"]


def _found(finder, text):
    return [text[start:end] for start, end in finder(text)]


@pytest.mark.parametrize("phone", PHONES)
def test_phone_numbers_in_common_formats(phone):
    assert _found(privacy.find_phones, f"Call me on {phone} tomorrow.") == [phone]


@pytest.mark.parametrize("text", NOT_PHONES)
def test_phone_look_alikes_do_not_match(text):
    assert _found(privacy.find_phones, text) == []


def test_phone_numbers_in_brackets():
    text = "Office (555-123-4567), home (+44 20 7946 0958) or (555) 123-4567."
    assert _found(privacy.find_phones, text) == ["555-123-4567", "+44 20 7946 0958", "(555) 123-4567"]


def test_emails():
    text = "Write to john.doe+news@example.co.uk. Or me@mail.example.com, not @handle, a@b or user@localhost."
    assert _found(privacy.find_emails, text) == ["john.doe+news@example.co.uk", "me@mail.example.com"]


def test_ipv4_accepts_valid_octets_only():
    text = "Hosts 10.0.0.1 and 192.168.1.254. Not 256.1.1.1, 1.2.3, 1.2.3.4.5, v1.2.3.4 or 01.2.3.4."
    assert _found(privacy.find_ipv4, text) == ["10.0.0.1", "192.168.1.254"]


def test_ipv6_is_validated_and_skips_look_alikes():
    text = ("Use fe80::1, ::1 and 2001:db8::8a2e:370:7334 or 2001:0db8:85a3:0000:0000:8a2e:0370:7334. Mapped: "
            "::ffff:192.0.2.128. Not std::vector, a::b, 12:30:45, fe80::1abz or the MAC 00:1A:2B:3C:4D:5E.")
    assert _found(privacy.find_ipv6, text) == ["fe80::1", "::1", "2001:db8::8a2e:370:7334",
                                               "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "::ffff:192.0.2.128"]


TEXT = "Mail jo@example.com or call +44 20 7946 0958 from 10.0.0.1 or fe80::1 before 2024-03-15."


def test_long_hex_and_digit_runs_are_not_pii():
    # 400 k characters that nearly match the IPv6 and phone patterns: the scan stays linear (a backtracking
    # pattern would take minutes here, which the prepare benchmark would show) and finds nothing
    blob = "de:ad:" + "be" * 200_000 + "g " + "1:" * 50_000 + "x " + "12 " * 50_000
    assert privacy.scrub_pii(blob).counts == {"email": 0, "ipv6": 0, "ipv4": 0, "phone": 0}


def test_scrub_replaces_every_kind_and_counts():
    result = privacy.scrub_pii(TEXT)
    assert result.keep and result.reason == ""
    assert result.text == "Mail <EMAIL> or call <PHONE> from <IP> or <IP> before 2024-03-15."
    assert result.counts == {"email": 1, "ipv6": 1, "ipv4": 1, "phone": 1}


def test_drop_and_off_modes():
    dropped = privacy.scrub_pii(TEXT, privacy.PrivacyConfig(email="drop", ipv4="drop"))
    assert not dropped.keep and dropped.reason == "email: 1 found; ipv4: 1 found"
    assert "jo@example.com" not in dropped.text                           # quotable without the address
    off = privacy.scrub_pii(TEXT, privacy.PrivacyConfig(phone="off", ipv6="off"))
    assert off.keep and off.counts == {"email": 1, "ipv4": 1}
    assert "+44 20 7946 0958" in off.text and "fe80::1" in off.text
    clean = privacy.scrub_pii("Nothing personal in 1999-2004.", privacy.PrivacyConfig(phone="drop"))
    assert clean.keep and clean.counts["phone"] == 0 and clean.text == "Nothing personal in 1999-2004."


def test_an_address_is_not_read_again_as_a_phone_number():
    result = privacy.scrub_pii("Server 192.168.100.200 is up.", privacy.PrivacyConfig())
    assert result.counts == {"email": 0, "ipv6": 0, "ipv4": 1, "phone": 0}
    # 10.20.30.40 has a phone number's shape (four groups of two digits); with IPv4 off it still is no phone.
    without_ip = privacy.scrub_pii("Server 10.20.30.40 is up.", privacy.PrivacyConfig(ipv4="off"))
    assert without_ip.counts["phone"] == 0 and without_ip.text == "Server 10.20.30.40 is up."


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match=r"PrivacyConfig.phone must be one of \('scrub', 'drop', 'off'\), got 'mask'"):
        privacy.PrivacyConfig(phone="mask")
