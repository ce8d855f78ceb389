#!/usr/bin/env python3
"""Generate deploy/examples/catalog.yaml: a realistic, deterministic example tariff catalog.

    python deploy/examples/make_catalog.py                 # seed 20261101 -> catalog.yaml
    python deploy/examples/make_catalog.py --seed 7 --out /tmp/catalog.yaml

The output follows the SPEC catalog format exactly (top-level keys version, currency,
destinations, zones, rate_tables, packages, plans). Every string is written double-quoted,
so ISO codes such as NO (Norway) never turn into YAML booleans and prefixes never turn into
integers. The same seed always produces the same bytes.

What is in it:
  * ~3000 E.164 destination prefixes in 60+ countries: NANP (US area codes, CA, Caribbean,
    toll-free 1800/1833/.../1888, premium 1900 and a few 976 exchanges), Europe, Asia,
    Oceania, the Americas, Africa and the Middle East, each prefix classed
    fixed | mobile | premium | tollfree.
  * Three exotic destinations (SH 290, FK 500, NF 6723) deliberately have no rate in
    `standard`, so the engine's `no_rate` rejection can be exercised.
  * Rate table `standard` (per-country prices with per-area and per-operator variation, the
    usual [60, 60], [30, 6] and [1, 1] increments, a handful of `intervals:` rates) and
    `inbound_tollfree` (used by the business plan as its inbound table: inbound calls to
    ordinary numbers in the home countries cost 0, inbound calls to toll-free numbers a small
    per-minute price).
  * Zones europe / asia / north_america, six packages and five plans.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_SEED = 20261101
VERSION = "2026-11-01"
CURRENCY = "USD"

# --------------------------------------------------------------------------- countries


def _s(text: str) -> tuple[str, ...]:
    """Space-separated codes -> tuple (keeps the long tables below readable)."""
    return tuple(text.split())


US_AREA_CODES = _s("""
201 202 203 205 206 207 208 209 210 212 213 214 215 216 217 218 219 220 223 224 225 227 228 229
231 234 239 240 248 251 252 253 254 256 260 262 267 269 270 272 274 276 279 281 283 301 302 303
304 305 307 308 309 310 312 313 314 315 316 317 318 319 320 321 323 325 326 330 331 332 334 336
337 339 341 346 347 350 351 352 360 361 364 369 380 385 386 401 402 404 405 406 407 408 409 410
412 413 414 415 417 419 423 424 425 430 432 434 435 440 442 443 445 447 448 458 463 464 469 470
472 475 478 479 480 484 501 502 503 504 505 507 508 509 510 512 513 515 516 517 518 520 530 531
534 539 540 541 551 557 559 561 562 563 564 567 570 571 572 573 574 575 580 582 585 586 601 602
603 605 606 607 608 609 610 612 614 615 616 617 618 619 620 623 626 628 629 630 631 636 640 641
646 650 651 656 657 659 660 661 662 667 669 678 680 681 682 689 701 702 703 704 706 707 708 712
713 714 715 716 717 718 719 720 724 725 726 727 728 730 731 732 734 737 740 743 747 754 757 760
762 763 765 769 770 771 772 773 774 775 779 781 785 786 801 802 803 804 805 806 808 810 812 813
814 815 816 817 818 820 826 828 830 831 832 835 838 839 840 843 845 847 848 850 854 856 857 858
859 860 862 863 864 865 870 872 878 901 903 904 906 907 908 909 910 912 913 914 915 916 917 918
919 920 925 928 929 930 931 934 936 937 938 940 941 943 945 947 948 949 951 952 954 956 959 970
971 972 973 978 979 980 983 984 985 986 989
""")

CA_AREA_CODES = _s("""
204 226 236 249 250 263 289 306 343 354 365 367 368 382 403 416 418 428 431 437 438 450 468 474
506 514 519 548 579 581 584 587 604 613 639 647 672 683 705 709 742 753 778 780 782 807 819 825
867 873 879 902 905
""")


@dataclass(frozen=True)
class Country:
    """One country's numbering plan (national prefixes, i.e. without the country code) and
    its base prices in the standard table."""

    iso: str
    cc: str
    fixed: tuple[str, ...] = ()
    mobile: tuple[str, ...] = ()
    premium: tuple[str, ...] = ()
    tollfree: tuple[str, ...] = ()
    root: bool = True  # the bare country code is itself a (fixed) destination
    # generated fixed area codes: (count, leading digits, national lengths, may nest under `fixed`)
    gen_fixed: tuple[int, str, tuple[int, ...], bool] | None = None
    # generated operator sub-ranges under mobile prefixes: (count, parents, extra digits)
    gen_mobile: tuple[int, tuple[str, ...], int] | None = None
    fixed_price: str = "0.0200"
    mobile_price: str = "0.0500"
    mobile_connect: str = "0"
    premium_price: str = "0.9900"
    premium_connect: str = "0.1000"
    tollfree_price: str = "0.0200"
    fixed_inc: tuple[int, int] = (60, 60)
    mobile_inc: tuple[int, int] = (60, 60)
    rated: bool = True  # False: exotic destination with no rate in `standard` (-> no_rate)
    fixed_overrides: dict[str, str] = field(default_factory=dict)  # national prefix -> price


COUNTRIES: tuple[Country, ...] = (
    # ---- North America (NANP, country code 1)
    Country("US", "1", fixed=US_AREA_CODES,
            premium=("900", "212976", "213976", "310976", "415976", "718976"),
            tollfree=_s("800 833 844 855 866 877 888"),
            fixed_price="0.0100", premium_price="0.9900", premium_connect="0.2500", tollfree_price="0",
            fixed_overrides={"907": "0.0250", "808": "0.0250"}),
    Country("CA", "1", root=False, fixed=CA_AREA_CODES, fixed_price="0.0120"),
    Country("PR", "1", root=False, fixed=_s("787 939"), fixed_price="0.0180"),
    Country("JM", "1", root=False, fixed=_s("876 658"), fixed_price="0.1500"),
    Country("DO", "1", root=False, fixed=_s("809 829 849"), fixed_price="0.0850"),
    Country("TT", "1", root=False, fixed=_s("868"), fixed_price="0.0950"),
    Country("BS", "1", root=False, fixed=_s("242"), fixed_price="0.1100"),
    Country("BB", "1", root=False, fixed=_s("246"), fixed_price="0.1300"),
    # ---- Europe
    Country("GB", "44",
            fixed=_s("20 121 131 141 151 161 113 114 115 116 117 118 1223 1865 28 29 23 24 3 56"),
            gen_fixed=(130, "1", (3, 4), False),
            mobile=("7",), gen_mobile=(70, _s("71 72 73 74 75 77 78 79"), 1),
            premium=_s("90 91 87"), tollfree=_s("800 808"),
            fixed_price="0.0200", mobile_price="0.0800", mobile_connect="0.0100",
            premium_price="1.5000", premium_connect="0.2500", tollfree_price="0",
            fixed_inc=(60, 60), mobile_inc=(30, 6)),
    Country("DE", "49",
            fixed=_s("30 40 89 69 221 211 711 201 231 351 341 511 421 911 228 611 621 202 203 234 "
                     "241 251 261 331 361 371 381 391 451 461 471 481 491 521 531 541 551 561 571 "
                     "581 591 631 641 651 661 671 681 721 731 741 751 761 771 781 791 821 831 841 "
                     "851 861 871 881 906 921 931 941 951 961 971 981 991"),
            gen_fixed=(190, "2345679", (4, 5), False),
            mobile=_s("15 16 17 1511 1512 1514 1515 1516 1517 1520 1521 1522 1523 1525 1529 1570 "
                      "1573 1575 1577 1578 1579 1590 160 162 163 170 171 172 173 174 175 176 177 178 179"),
            premium=_s("900 137 118"), tollfree=("800",),
            fixed_price="0.0090", mobile_price="0.0450", premium_price="1.9900", premium_connect="0.2000",
            fixed_inc=(1, 1), mobile_inc=(1, 1)),
    Country("FR", "33", fixed=_s("1 2 3 4 5 9"), gen_fixed=(50, "12345", (3,), True),
            mobile=_s("6 7 60 61 62 63 64 65 66 67 68 69 73 74 75 76 77 78"),
            premium=_s("89 891 892 897 899"), tollfree=_s("800 805"),
            fixed_price="0.0110", mobile_price="0.0390", premium_price="0.8000", mobile_inc=(30, 6)),
    Country("ES", "34", fixed=_s("91 93 95 96 94 98 97 92 81 82 83 84 85 86 87 88"),
            gen_fixed=(50, "89", (3,), True),
            mobile=_s("6 7 60 61 62 63 64 65 66 67 68 69 71 72 73 74"),
            premium=_s("803 806 807 905"), tollfree=_s("800 900"),
            fixed_price="0.0120", mobile_price="0.0350", mobile_inc=(30, 6)),
    Country("IT", "39", fixed=_s("0 02 06 011 010 051 055 081 091 041 045 049 070 080 095"),
            gen_fixed=(40, "0", (3, 4), True),
            mobile=("3",), gen_mobile=(40, _s("32 33 34 35 36 37 38 39"), 1),
            premium=_s("899 892 894"), tollfree=_s("800 803"),
            fixed_price="0.0120", mobile_price="0.0420", fixed_inc=(30, 6), mobile_inc=(30, 6)),
    Country("NL", "31",
            fixed=_s("10 20 30 70 40 50 13 15 23 24 26 33 35 38 43 45 46 53 55 58 71 72 73 74 75 76 "
                     "77 78 79 85 88"),
            gen_fixed=(15, "1234570", (3,), False),
            mobile=_s("6 61 62 63 64 65"), premium=_s("900 906 909"), tollfree=("800",),
            fixed_price="0.0130", mobile_price="0.0550", fixed_inc=(1, 1), mobile_inc=(1, 1)),
    Country("BE", "32",
            fixed=_s("2 3 4 9 50 51 52 53 54 55 56 57 58 59 60 61 63 64 65 67 69 71 80 81 82 83 84 "
                     "85 86 87 89"),
            mobile=_s("46 47 48 49"), gen_mobile=(20, _s("46 47 48 49"), 1),
            premium=_s("900 902 903 905"), tollfree=("800",),
            fixed_price="0.0140", mobile_price="0.0600", mobile_inc=(30, 6)),
    Country("PT", "351",
            fixed=_s("2 21 22 231 232 234 239 244 249 253 256 258 259 266 268 275 289 291 296"),
            mobile=_s("9 91 92 93 96"), premium=_s("760 761"), tollfree=_s("800 808"),
            fixed_price="0.0150", mobile_price="0.0700"),
    Country("IE", "353",
            fixed=_s("1 21 22 23 24 25 26 27 28 29 41 42 43 44 45 46 47 49 51 52 53 56 57 58 59 61 "
                     "62 63 64 65 66 67 68 69 71 74 90 91 93 94 95 96 97 98 99"),
            mobile=_s("8 83 85 86 87 89"), premium=_s("1550 1570 1580 1590"), tollfree=("1800",),
            fixed_price="0.0140", mobile_price="0.0500", mobile_inc=(30, 6)),
    Country("SE", "46",
            fixed=_s("8 31 40 18 13 11 16 19 21 23 26 33 35 36 42 44 46 54 60 63 90 920"),
            gen_fixed=(25, "123456", (3,), False),
            mobile=_s("7 70 72 73 76 79"), premium=_s("900 939 944"), tollfree=("20",),
            fixed_price="0.0110", mobile_price="0.0250", fixed_inc=(1, 1), mobile_inc=(1, 1)),
    Country("NO", "47", fixed=_s("2 3 5 6 7"), gen_fixed=(20, "23567", (2,), True),
            mobile=_s("4 9 40 41 45 46 47 48 90 91 92 93 94 95 96 97 98 99"),
            premium=_s("820 829"), tollfree=("800",),
            fixed_price="0.0130", mobile_price="0.0280"),
    Country("DK", "45",
            fixed=_s("3 4 5 6 7 8 9 32 33 35 36 38 39 43 44 45 46 47 48 49 62 63 64 65 66 69 70 72 "
                     "73 74 75 76 86 87 89 96 97 98 99"),
            mobile=_s("2 30 31 40 41 42 50 51 52 53 60 61 71 81 91 92 93"),
            premium=_s("90 901 906"), tollfree=("80",),
            fixed_price="0.0120", mobile_price="0.0240", fixed_inc=(1, 1), mobile_inc=(1, 1)),
    Country("FI", "358", fixed=_s("9 2 3 5 6 8 13 14 15 16 17 18 19"),
            mobile=_s("4 40 41 42 43 44 45 46 50"), premium=_s("600 700"), tollfree=("800",),
            fixed_price="0.0250", mobile_price="0.0600"),
    Country("PL", "48",
            fixed=_s("12 13 14 15 16 17 18 22 23 24 25 29 32 33 34 41 42 43 44 46 48 52 54 55 56 58 "
                     "59 61 62 63 65 67 68 71 74 75 76 77 81 82 83 84 85 86 87 89 91 94 95"),
            mobile=_s("50 51 53 57 60 66 69 72 73 78 79 88"),
            gen_mobile=(20, _s("50 51 53 57 60 66 69 72 73 78 79 88"), 1),
            premium=_s("700 701 703"), tollfree=("800",),
            fixed_price="0.0130", mobile_price="0.0190"),
    Country("AT", "43", fixed=_s("1 316 662 512 732 463 2742 5572 7242 3842 2622 4242"),
            gen_fixed=(40, "234567", (3, 4), False),
            mobile=_s("650 660 664 676 677 680 681 688 690 699"),
            premium=_s("900 901 930 939"), tollfree=("800",),
            fixed_price="0.0160", mobile_price="0.0500", mobile_inc=(30, 6)),
    Country("CH", "41",
            fixed=_s("21 22 24 26 27 31 32 33 34 41 43 44 52 55 56 58 61 62 71 81 91"),
            mobile=_s("75 76 77 78 79"), premium=_s("900 901 906"), tollfree=("800",),
            fixed_price="0.0180", mobile_price="0.1100", mobile_connect="0.0100", mobile_inc=(30, 6)),
    Country("CZ", "420",
            fixed=_s("2 31 32 35 37 38 39 41 46 47 48 49 51 53 54 55 56 57 58 59"),
            mobile=_s("601 602 603 604 605 606 607 608 72 73 77 79"),
            gen_mobile=(15, _s("72 73 77 79"), 1),
            premium=_s("900 906 909"), tollfree=("800",),
            fixed_price="0.0160", mobile_price="0.0350"),
    Country("GR", "30", fixed=_s("21 210 2310 22 23 24 25 26 27 28"), gen_fixed=(25, "2", (4,), True),
            mobile=_s("69 690 693 694 695 697 698 699"), premium=_s("901 909"), tollfree=("800",),
            fixed_price="0.0120", mobile_price="0.0450"),
    Country("HU", "36",
            fixed=_s("1 22 24 25 26 27 28 29 32 33 34 35 36 37 42 44 45 46 47 48 49 52 53 54 56 57 "
                     "59 62 63 66 68 69 72 73 74 75 76 77 78 79 82 83 84 85 87 88 89 92 93 94 95 96 99"),
            mobile=_s("20 30 31 50 70"), premium=("90",), tollfree=("80",),
            fixed_price="0.0180", mobile_price="0.0450"),
    Country("RO", "40", fixed=_s("21 31 2 3"), gen_fixed=(20, "23", (3,), True),
            mobile=_s("7 72 73 74 75 76 77 78 79"), premium=_s("900 903 906"), tollfree=("800",),
            fixed_price="0.0250", mobile_price="0.0300"),
    Country("BG", "359", fixed=_s("2 32 52 56 42 64 82 58 62 66"), mobile=_s("87 88 89 98 99"),
            premium=("90",), tollfree=("800",), fixed_price="0.0300", mobile_price="0.0900"),
    Country("HR", "385",
            fixed=_s("1 20 21 22 23 31 32 33 34 35 40 42 43 44 47 48 49 51 52 53"),
            mobile=_s("91 92 95 97 98 99"), premium=_s("60 61 64 69"), tollfree=("800",),
            fixed_price="0.0350", mobile_price="0.0800"),
    Country("SK", "421",
            fixed=_s("2 31 32 33 34 35 36 37 38 41 42 43 44 45 46 47 48 51 52 53 54 55 56 57 58"),
            mobile=_s("9 901 902 903 904 905 906 907 908 910 911 914 915 916 917 918 919 940 944 948 "
                      "949 950"),
            premium=("900",), tollfree=("800",), fixed_price="0.0170", mobile_price="0.0500"),
    Country("SI", "386", fixed=_s("1 2 3 4 5 7"), mobile=_s("30 31 40 41 51 64 68 70 71"),
            premium=("90",), tollfree=("80",), fixed_price="0.0300", mobile_price="0.0900"),
    Country("LU", "352", mobile=_s("621 628 661 668 671 691 698"), premium=_s("900 901 905"),
            tollfree=("800",), fixed_price="0.0150", mobile_price="0.1100"),
    Country("EE", "372", fixed=_s("6 3 4 7"), mobile=_s("5 81 82"), premium=("900",),
            tollfree=("800",), fixed_price="0.0300", mobile_price="0.1000"),
    Country("LV", "371", fixed=("6",), mobile=("2",), premium=("90",), tollfree=("80",),
            fixed_price="0.0350", mobile_price="0.1000"),
    Country("LT", "370", fixed=_s("5 37 46 41 45"), mobile=("6",), premium=("900",),
            tollfree=("800",), fixed_price="0.0300", mobile_price="0.0700"),
    Country("IS", "354", fixed=_s("4 5"), mobile=_s("6 7 8"), premium=("900",), tollfree=("800",),
            fixed_price="0.0300", mobile_price="0.0600"),
    Country("CY", "357", fixed=_s("22 23 24 25 26"), mobile=_s("96 97 99"), premium=("90",),
            tollfree=("800",), fixed_price="0.0200", mobile_price="0.0300"),
    Country("MT", "356", fixed=_s("21 22 23 27"), mobile=_s("77 79 98 99"), premium=("50",),
            tollfree=("800",), fixed_price="0.0250", mobile_price="0.1000"),
    # ---- Asia
    Country("IN", "91", fixed=_s("11 22 33 44 40 20 120 124 172 141 135 484 471 422"),
            gen_fixed=(110, "12345", (3, 4), False),
            mobile=tuple(f"{a}{b}" for a in "6789" for b in "0123456789"),
            gen_mobile=(90, tuple(f"{a}{b}" for a in "6789" for b in "0123456789"), 2),
            premium=("1900",), tollfree=("1800",),
            fixed_price="0.0150", mobile_price="0.0170", fixed_inc=(1, 1), mobile_inc=(1, 1)),
    Country("CN", "86", fixed=_s("10 20 21 22 23 24 25 27 28 29 755 571 532 512 592"),
            gen_fixed=(90, "3456789", (3,), False),
            mobile=_s("130 131 132 133 134 135 136 137 138 139 145 147 149 150 151 152 153 155 156 "
                      "157 158 159 166 170 171 172 173 175 176 177 178 180 181 182 183 184 185 186 "
                      "187 188 189 190 191 193 195 196 197 198 199"),
            tollfree=_s("400 800"), fixed_price="0.0120", mobile_price="0.0120"),
    Country("JP", "81",
            fixed=_s("3 6 52 11 92 75 45 78 22 82 96 98 99 25 27 28 29 42 43 44 46 47 48 53 54 55 "
                     "58 59 72 73 76 77 79 83 84 86 87 88 89 93 95 97 50"),
            mobile=_s("70 80 90"), premium=("990",), tollfree=_s("120 800"),
            fixed_price="0.0300", mobile_price="0.1000", mobile_inc=(30, 6)),
    Country("SG", "65", fixed=("6",), mobile=_s("8 9"), premium=("1900",), tollfree=("800",),
            fixed_price="0.0100", mobile_price="0.0100"),
    Country("HK", "852", fixed=_s("2 3"),
            mobile=_s("5 6 9 51 53 54 55 56 59 61 62 63 64 65 66 67 68 69 90 91 92 93 94 95 96 97 98"),
            tollfree=("800",), fixed_price="0.0100", mobile_price="0.0100"),
    Country("KR", "82", fixed=_s("2 31 32 33 41 42 43 44 51 52 53 54 55 61 62 63 64"),
            mobile=("10",), gen_mobile=(8, ("10",), 2), premium=("60",), tollfree=("80",),
            fixed_price="0.0200", mobile_price="0.0250"),
    Country("PH", "63",
            fixed=_s("2 32 33 34 35 36 38 42 43 44 45 46 47 48 49 52 53 54 55 56 62 63 64 65 68 72 "
                     "74 75 77 78 82 83 84 85 86 87 88"),
            mobile=("9",), gen_mobile=(40, _s("90 91 92 93 94 95 96 97 98 99"), 1),
            premium=("1900",), tollfree=("1800",), fixed_price="0.1200", mobile_price="0.1500"),
    Country("ID", "62", fixed=_s("21 22 24 31 61 274 341 361 411 431 511 541 561 711 751 778"),
            gen_fixed=(25, "234567", (3,), False),
            mobile=("8",), gen_mobile=(30, _s("81 82 83 85 87 88 89"), 1),
            premium=("809",), tollfree=("800",), fixed_price="0.0500", mobile_price="0.0700"),
    Country("MY", "60", fixed=_s("3 4 5 6 7 82 83 84 85 86 87 88 89 9"),
            mobile=_s("1 10 11 12 13 14 16 17 18 19"), premium=("1600",), tollfree=("1800",),
            fixed_price="0.0150", mobile_price="0.0250"),
    Country("TH", "66",
            fixed=_s("2 32 33 34 35 36 37 38 39 42 43 44 45 53 54 55 56 73 74 75 76 77"),
            mobile=_s("6 8 9 61 62 63 64 65 80 81 82 83 84 85 86 87 88 89 90 91 92 93 94 95 96 97 98 99"),
            premium=("1900",), tollfree=("1800",), fixed_price="0.0200", mobile_price="0.0200"),
    Country("VN", "84", fixed=_s("24 28 2"), gen_fixed=(30, "2", (3,), True),
            mobile=_s("3 5 7 8 9 32 33 34 35 36 37 38 39 56 58 59 70 76 77 78 79 81 82 83 84 85 86 "
                      "88 89 90 91 92 93 94 96 97 98 99"),
            premium=("1900",), tollfree=("1800",), fixed_price="0.0800", mobile_price="0.0700"),
    # ---- Oceania
    Country("AU", "61", fixed=_s("2 3 7 8 13 1300"), mobile=_s("4 40 41 42 43 44 45 46 47 48 49"),
            premium=("190",), tollfree=("1800",),
            fixed_price="0.0150", mobile_price="0.0350", mobile_inc=(30, 6)),
    Country("NZ", "64", fixed=_s("3 4 6 7 9"), mobile=_s("2 20 21 22 27 28 29"), premium=("900",),
            tollfree=_s("800 508"), fixed_price="0.0250", mobile_price="0.0600"),
    # ---- Latin America
    Country("BR", "55",
            fixed=_s("11 12 13 14 15 16 17 18 19 21 22 24 27 28 31 32 33 34 35 37 38 41 42 43 44 45 "
                     "46 47 48 49 51 53 54 55 61 62 63 64 65 66 67 68 69 71 73 74 75 77 79 81 82 83 "
                     "84 85 86 87 88 89 91 92 93 94 95 96 97 98 99"),
            mobile=tuple(f"{d}9" for d in _s(
                "11 12 13 14 15 16 17 18 19 21 22 24 27 28 31 32 33 34 35 37 38 41 42 43 44 45 46 "
                "47 48 49 51 53 54 55 61 62 63 64 65 66 67 68 69 71 73 74 75 77 79 81 82 83 84 85 "
                "86 87 88 89 91 92 93 94 95 96 97 98 99")),
            tollfree=("800",), fixed_price="0.0180", mobile_price="0.0550", mobile_inc=(30, 6)),
    Country("MX", "52", fixed=_s("55 33 81 222 229 442 477 664 686 656 614 999 998 984 322 624"),
            gen_fixed=(40, "2345689", (3,), False),
            mobile=("1",), premium=("900",), tollfree=("800",),
            fixed_price="0.0100", mobile_price="0.0150"),
    Country("AR", "54", fixed=_s("11 351 341 261 221 223 381 387 342 299"),
            mobile=_s("9 911 9351 9341 9261 9221"), tollfree=("800",),
            fixed_price="0.0200", mobile_price="0.0700"),
    Country("CO", "57", root=True, fixed=_s("601 602 604 605 606 607 608"),
            mobile=_s("3 300 301 302 304 305 310 311 312 313 314 315 316 317 318 319 320 321 322 "
                      "323 324 350 351"),
            fixed_price="0.0150", mobile_price="0.0250"),
    Country("CL", "56",
            fixed=_s("2 32 33 34 35 41 42 43 45 51 52 53 55 57 58 61 63 64 65 67 71 72 73 75"),
            mobile=("9",), tollfree=("800",), fixed_price="0.0200", mobile_price="0.0300"),
    # ---- Middle East, Africa, Eurasia
    Country("TR", "90",
            fixed=_s("212 216 312 232 224 242 322 332 342 352 362 412 422 442 462 482 222 236 246 "
                     "256 266 272 282 286 326 346 356 366 376 384 424 432 452 464 472 488"),
            mobile=_s("5 50 53 54 55"), gen_mobile=(25, _s("50 53 54 55"), 1),
            premium=("900",), tollfree=("800",), fixed_price="0.0500", mobile_price="0.1400"),
    Country("AE", "971", fixed=_s("2 3 4 6 7 9"), mobile=_s("5 50 52 54 55 56 58"),
            premium=("900",), tollfree=("800",), fixed_price="0.1200", mobile_price="0.1500"),
    Country("IL", "972", fixed=_s("2 3 4 8 9 77"), mobile=_s("5 50 51 52 53 54 55 58"),
            premium=("1900",), tollfree=("1800",), fixed_price="0.0150", mobile_price="0.0200"),
    Country("SA", "966", fixed=_s("11 12 13 14 16 17"), mobile=_s("5 50 53 54 55 56 58 59"),
            tollfree=("800",), fixed_price="0.1000", mobile_price="0.1200"),
    Country("EG", "20",
            fixed=_s("2 3 13 40 45 47 48 50 55 57 62 64 65 66 68 82 84 86 88 92 93 95 96 97"),
            mobile=_s("10 11 12 15"), tollfree=("800",), fixed_price="0.0900", mobile_price="0.1200"),
    Country("ZA", "27",
            fixed=_s("11 21 31 12 41 51 13 14 15 16 17 18 22 23 28 33 34 35 36 39 40 42 43 44 45 46 "
                     "47 48 49 53 54 56 57 58"),
            mobile=_s("6 7 8 60 61 62 63 64 65 66 67 68 71 72 73 74 76 78 79 81 82 83 84"),
            premium=("86",), tollfree=("800",), fixed_price="0.0350", mobile_price="0.1100"),
    Country("NG", "234", fixed=_s("1 9 2 42 52 64 84"),
            mobile=_s("70 80 81 90 91 701 703 705 706 708 802 803 805 806 807 808 809 810 811 812 "
                      "813 814 815 816 817 818 901 902 903 904 905 906 907 908 909 912 913 915 916"),
            fixed_price="0.1000", mobile_price="0.1100"),
    Country("RU", "7",
            fixed=_s("495 499 812 343 383 381 391 846 861 863 843 831 351 342 473 485 3452 4212 4232"),
            gen_fixed=(40, "348", (3,), False),
            mobile=("9",), gen_mobile=(40, _s("90 91 92 93 95 96 97 98 99"), 1),
            premium=("809",), tollfree=("800",), fixed_price="0.0300", mobile_price="0.1500"),
    Country("KZ", "7", root=False,
            fixed=_s("727 717 7212 7222 7232 7242 7252 7262 7272 7282 7292 7112 7122 7132 7142 "
                     "7152 7162 7182"),
            mobile=_s("700 701 702 705 707 708 747 771 775 776 777 778"),
            fixed_price="0.1500", mobile_price="0.1500"),
    # ---- exotic: in `destinations` but deliberately without a rate (-> no_rate)
    Country("SH", "290", rated=False),
    Country("FK", "500", rated=False),
    Country("NF", "672", root=False, fixed=("3",), rated=False),
)

EUROPE = _s("GB DE FR ES IT NL BE PT IE SE NO DK FI PL AT CH CZ GR HU RO BG HR SK SI LU EE LV LT "
            "IS CY MT")
ASIA = _s("IN CN JP SG HK KR PH ID MY TH VN")
NORTH_AMERICA = ["US", "CA"]

# Rates written in the `intervals:` form (rate groups), keyed by full prefix.
INTERVAL_RATES: dict[str, dict[str, Any]] = {
    # Portugal mobile: first minute billed whole, then per second and cheaper (SPEC example).
    "3519": {"connect_fee": "0.0400", "intervals": [
        {"from_s": 0, "per_minute": "0.2000", "increment_s": 60},
        {"from_s": 60, "per_minute": "0.1000", "increment_s": 1}]},
    "35191": {"connect_fee": "0.0400", "intervals": [
        {"from_s": 0, "per_minute": "0.1900", "increment_s": 60},
        {"from_s": 60, "per_minute": "0.0950", "increment_s": 1}]},
    "35192": {"connect_fee": "0.0400", "intervals": [
        {"from_s": 0, "per_minute": "0.1950", "increment_s": 60},
        {"from_s": 60, "per_minute": "0.0980", "increment_s": 1}]},
    "35193": {"connect_fee": "0.0400", "intervals": [
        {"from_s": 0, "per_minute": "0.2100", "increment_s": 60},
        {"from_s": 60, "per_minute": "0.1050", "increment_s": 1}]},
    "35196": {"connect_fee": "0.0400", "intervals": [
        {"from_s": 0, "per_minute": "0.2000", "increment_s": 60},
        {"from_s": 60, "per_minute": "0.1000", "increment_s": 1}]},
    # UK premium: dear first five minutes, then half price.
    "4490": {"connect_fee": "0.2500", "intervals": [
        {"from_s": 0, "per_minute": "1.5000", "increment_s": 60},
        {"from_s": 300, "per_minute": "0.9000", "increment_s": 60}]},
    "4491": {"connect_fee": "0.2500", "intervals": [
        {"from_s": 0, "per_minute": "1.2000", "increment_s": 60},
        {"from_s": 300, "per_minute": "0.7500", "increment_s": 60}]},
    # German premium: first ten minutes per minute, then 30 s blocks at half price.
    "49900": {"connect_fee": "0.2000", "intervals": [
        {"from_s": 0, "per_minute": "1.9900", "increment_s": 60},
        {"from_s": 600, "per_minute": "0.9900", "increment_s": 30}]},
    # French premium: three rate groups.
    "3389": {"connect_fee": "0.1500", "intervals": [
        {"from_s": 0, "per_minute": "0.8000", "increment_s": 30},
        {"from_s": 120, "per_minute": "0.5000", "increment_s": 10},
        {"from_s": 600, "per_minute": "0.3000", "increment_s": 1}]},
}

# inbound_tollfree: what an inbound call costs, keyed by the called (`to`) number.
INBOUND_FREE_ROOTS = ("1", "44", "49", "33", "91")  # home countries: ordinary numbers are free
INBOUND_TOLLFREE: tuple[tuple[str, str, tuple[int, int]], ...] = (
    ("1800", "0.0180", (6, 6)), ("1833", "0.0180", (6, 6)), ("1844", "0.0180", (6, 6)),
    ("1855", "0.0180", (6, 6)), ("1866", "0.0180", (6, 6)), ("1877", "0.0180", (6, 6)),
    ("1888", "0.0180", (6, 6)),
    ("44800", "0.0350", (60, 60)), ("44808", "0.0350", (60, 60)),
    ("49800", "0.0400", (60, 60)), ("33800", "0.0400", (60, 60)), ("911800", "0.0300", (1, 1)),
)

PACKAGES: dict[str, dict[str, Any]] = {
    "us-domestic": {"countries": ["US"], "classes": ["fixed", "mobile"], "scope": "domestic",
                    "minutes": "unlimited", "fair_use_minutes": 5000},
    "north-america": {"countries": "zone:north_america", "classes": ["fixed", "mobile"],
                      "scope": "international", "minutes": 3000},
    "europe": {"countries": "zone:europe", "classes": ["fixed", "mobile"],
               "scope": "international", "minutes": 1000},
    "europe-fixed": {"countries": "zone:europe", "classes": ["fixed"],
                     "scope": "international", "minutes": 2000},
    "asia": {"countries": "zone:asia", "classes": ["fixed", "mobile"],
             "scope": "international", "minutes": 500},
    "dev-free": {"countries": ["US", "GB"], "classes": ["fixed"],
                 "scope": "international", "minutes": 60},
}

PLANS: dict[str, dict[str, Any]] = {
    "starter": {
        "monthly_fee": "19.00", "billing": "prepaid", "rate_table": "standard",
        "inbound_rate_table": None, "packages": ["us-domestic"],
        "sms": {"outbound": "0.0079", "inbound": "0"}, "meters": {}, "allow_premium": True,
    },
    "pro": {
        "monthly_fee": "49.00", "billing": "prepaid", "rate_table": "standard",
        "inbound_rate_table": None, "packages": ["us-domestic", "europe", "asia"],
        "sms": {"outbound": "0.0075", "inbound": "0"}, "meters": {}, "allow_premium": True,
    },
    "business": {
        "monthly_fee": "99.00", "billing": "postpaid", "rate_table": "standard",
        "inbound_rate_table": "inbound_tollfree",
        "packages": ["us-domestic", "north-america", "europe", "asia"],
        "sms": {"outbound": "0.0070", "inbound": "0.0010"}, "meters": {}, "allow_premium": True,
    },
    "developer": {
        "monthly_fee": "0", "billing": "prepaid", "rate_table": "standard",
        "inbound_rate_table": None, "packages": ["dev-free"],
        "sms": {"outbound": "0.0085", "inbound": "0"},
        "meters": {"llm_tokens": "0.000003", "tts_characters": "0.000020", "stt_seconds": "0.0005"},
        "allow_premium": False,
    },
    "voice-ai": {
        "monthly_fee": "29.00", "billing": "prepaid", "rate_table": "standard",
        "inbound_rate_table": None, "packages": [],
        "sms": {"outbound": "0.0075", "inbound": "0"},
        "meters": {"llm_tokens": "0.000002", "tts_characters": "0.000015", "stt_seconds": "0.0004"},
        "allow_premium": True,
    },
}

# --------------------------------------------------------------------------- generation

Q4 = Decimal("0.0001")


def _price(base: str, factor: float = 1.0) -> str:
    value = (Decimal(base) * Decimal(str(round(factor, 3)))).quantize(Q4, rounding=ROUND_HALF_UP)
    return str(max(value, Q4)) if Decimal(base) > 0 else "0"


def _related(a: str, b: str) -> bool:
    return a.startswith(b) or b.startswith(a)


def _gen_codes(rng: random.Random, count: int, leading: str, lengths: tuple[int, ...],
               avoid: list[str], nest_ok: set[str]) -> list[str]:
    """`count` distinct national codes, prefix-free among themselves and against `avoid`
    (except that they may sit under a prefix in `nest_ok`)."""
    out: list[str] = []
    tries = 0
    while len(out) < count and tries < count * 200:
        tries += 1
        n = rng.choice(lengths)
        code = rng.choice(leading) + "".join(rng.choice("0123456789") for _ in range(n - 1))
        if any(_related(code, a) and not (a in nest_ok and code.startswith(a)) for a in avoid):
            continue
        if any(_related(code, o) for o in out):
            continue
        out.append(code)
    return out


@dataclass
class Built:
    destinations: list[dict[str, str]]
    standard: list[dict[str, Any]]


def build_destinations_and_rates(seed: int) -> Built:
    rng = random.Random(seed)
    dests: list[dict[str, str]] = []
    rates: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add_dest(prefix: str, iso: str, cls: str) -> bool:
        if prefix in seen:
            return False
        seen.add(prefix)
        dests.append({"prefix": prefix, "country": iso, "class": cls})
        return True

    def add_rate(prefix: str, per_minute: str, inc: tuple[int, int], connect: str = "0") -> None:
        if prefix in INTERVAL_RATES:
            rates.append({"prefix": prefix, **INTERVAL_RATES[prefix]})
        else:
            rates.append({"prefix": prefix, "per_minute": per_minute, "connect_fee": connect,
                          "increments": [inc[0], inc[1]]})

    for c in COUNTRIES:
        fixed = list(c.fixed)
        mobile = list(c.mobile)
        special = [*c.premium, *c.tollfree]
        if c.gen_fixed:
            count, leading, lengths, nest = c.gen_fixed
            avoid = [*fixed, *mobile, *special]
            fixed += _gen_codes(rng, count, leading, lengths, avoid, set(c.fixed) if nest else set())
        if c.gen_mobile:
            count, parents, extra = c.gen_mobile
            taken = set(mobile)
            made = 0
            tries = 0
            while made < count and tries < count * 100:
                tries += 1
                code = rng.choice(parents) + "".join(rng.choice("0123456789") for _ in range(extra))
                if code in taken or any(_related(code, s) for s in [*special, *fixed]):
                    continue
                taken.add(code)
                mobile.append(code)
                made += 1

        if c.root and add_dest(c.cc, c.iso, "fixed") and c.rated:
            add_rate(c.cc, c.fixed_price, c.fixed_inc)
        for code in fixed:
            full = c.cc + code
            if not add_dest(full, c.iso, "fixed") or not c.rated:
                continue
            if code in c.fixed_overrides:
                add_rate(full, c.fixed_overrides[code], c.fixed_inc)
            elif not c.root:
                # no country-wide rate to fall back on (shared country code): rate every code
                add_rate(full, _price(c.fixed_price, rng.uniform(0.95, 1.15)), c.fixed_inc)
            elif rng.random() < 0.25:
                # rural / high-cost areas priced above the national fixed rate
                add_rate(full, _price(c.fixed_price, rng.uniform(0.9, 1.6)), c.fixed_inc)
        for i, code in enumerate(mobile):
            full = c.cc + code
            if add_dest(full, c.iso, "mobile") and c.rated:
                factor = 1.0 if i == 0 else rng.uniform(0.9, 1.25)  # operator-level variation
                add_rate(full, _price(c.mobile_price, factor), c.mobile_inc, c.mobile_connect)
        for code in c.premium:
            full = c.cc + code
            if add_dest(full, c.iso, "premium") and c.rated:
                add_rate(full, _price(c.premium_price, rng.uniform(0.8, 1.3)), (60, 60), c.premium_connect)
        for code in c.tollfree:
            full = c.cc + code
            if add_dest(full, c.iso, "tollfree") and c.rated:
                add_rate(full, c.tollfree_price, (60, 60))
    return Built(dests, rates)


def build_catalog(seed: int = DEFAULT_SEED) -> dict[str, Any]:
    built = build_destinations_and_rates(seed)
    countries = {d["country"] for d in built.destinations}
    zones = {
        "europe": [c for c in EUROPE if c in countries],
        "asia": [c for c in ASIA if c in countries],
        "north_america": [c for c in NORTH_AMERICA if c in countries],
    }
    inbound: list[dict[str, Any]] = [
        {"prefix": p, "per_minute": "0", "connect_fee": "0", "increments": [60, 60]}
        for p in INBOUND_FREE_ROOTS
    ]
    inbound += [
        {"prefix": p, "per_minute": price, "connect_fee": "0", "increments": [inc[0], inc[1]]}
        for p, price, inc in INBOUND_TOLLFREE
    ]
    catalog = {
        "version": VERSION,
        "currency": CURRENCY,
        "destinations": built.destinations,
        "zones": zones,
        "rate_tables": {"standard": built.standard, "inbound_tollfree": inbound},
        "packages": PACKAGES,
        "plans": PLANS,
    }
    problems = self_check(catalog)
    if problems:
        raise SystemExit("generated catalog is inconsistent:\n  " + "\n  ".join(problems))
    return catalog


def self_check(catalog: dict[str, Any]) -> list[str]:
    """The SPEC rules that are cheap to check here (the real validator lives in rating/)."""
    problems: list[str] = []
    prefixes = [d["prefix"] for d in catalog["destinations"]]
    dupes = [p for p, n in Counter(prefixes).items() if n > 1]
    if dupes:
        problems.append(f"duplicate destination prefixes: {dupes[:10]}")
    for p in prefixes:
        if not (p.isdigit() and p.isascii() and 1 <= len(p) <= 15):
            problems.append(f"bad prefix {p!r}")
    for name, table in catalog["rate_tables"].items():
        tp = [r["prefix"] for r in table]
        dupes = [p for p, n in Counter(tp).items() if n > 1]
        if dupes:
            problems.append(f"rate table {name}: duplicate prefixes {dupes[:10]}")
        for r in table:
            ivs = r.get("intervals")
            if ivs:
                if ivs[0]["from_s"] != 0:
                    problems.append(f"{name}/{r['prefix']}: first interval not at 0")
                for a, b in zip(ivs, ivs[1:], strict=False):
                    if b["from_s"] <= a["from_s"] or (b["from_s"] - a["from_s"]) % a["increment_s"]:
                        problems.append(f"{name}/{r['prefix']}: bad interval boundary {a} -> {b}")
    for name, pkg in catalog["packages"].items():
        if set(pkg["classes"]) & {"premium", "tollfree"}:
            problems.append(f"package {name} lists premium/tollfree")
    return problems


# --------------------------------------------------------------------------- YAML writer


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid YAML double-quoted scalar
    raise TypeError(f"unsupported value {value!r}")


def _flow(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return _scalar(value)


def to_yaml(catalog: dict[str, Any], seed: int) -> str:
    out: list[str] = [
        "# Example tariff catalog (SPEC \"Catalog\"). Generated by deploy/examples/make_catalog.py",
        f"# --seed {seed}; regenerate instead of editing by hand. Prices are per minute in {catalog['currency']}.",
        f"version: {_scalar(catalog['version'])}",
        f"currency: {_scalar(catalog['currency'])}",
        "",
        "destinations:                 # longest prefix of the dialled digits wins",
    ]
    last = None
    for d in catalog["destinations"]:
        if d["country"] != last:
            out.append(f"  # {d['country']}")
            last = d["country"]
        out.append(f"  - {_flow(d)}")
    out += ["", "zones:"]
    for name, members in catalog["zones"].items():
        out.append(f"  {name}: {_flow(members)}")
    out += ["", "rate_tables:"]
    dest_country = {d["prefix"]: d["country"] for d in catalog["destinations"]}
    for name, table in catalog["rate_tables"].items():
        out.append(f"  {name}:")
        last = None
        for r in table:
            country = dest_country.get(r["prefix"])
            if name == "standard" and country and country != last:
                out.append(f"    # {country}")
                last = country
            out.append(f"    - {_flow(r)}")
    out += ["", "packages:"]
    for name, pkg in catalog["packages"].items():
        out.append(f"  {name}: {_flow(pkg)}")
    out += ["", "plans:"]
    for name, plan in catalog["plans"].items():
        out.append(f"  {name}:")
        for key, value in plan.items():
            out.append(f"    {key}: {_flow(value)}")
    return "\n".join(out) + "\n"


def summary(catalog: dict[str, Any]) -> str:
    by_country: dict[str, Counter[str]] = {}
    for d in catalog["destinations"]:
        by_country.setdefault(d["country"], Counter())[d["class"]] += 1
    classes = Counter(d["class"] for d in catalog["destinations"])
    lines = [
        f"{len(catalog['destinations'])} destination prefixes in {len(by_country)} countries "
        f"({', '.join(f'{k} {classes[k]}' for k in ('fixed', 'mobile', 'premium', 'tollfree'))})",
    ]
    for name, table in catalog["rate_tables"].items():
        n_iv = sum(1 for r in table if "intervals" in r)
        lines.append(f"rate table {name}: {len(table)} prefixes ({n_iv} with intervals)")
    for iso, cnt in by_country.items():
        lines.append(f"  {iso}: " + " ".join(f"{k}={cnt[k]}" for k in ("fixed", "mobile", "premium", "tollfree") if cnt[k]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--out", type=Path, default=HERE / "catalog.yaml")
    ap.add_argument("--summary", action="store_true", help="print prefix counts per country/class")
    args = ap.parse_args(argv)
    catalog = build_catalog(args.seed)
    args.out.write_text(to_yaml(catalog, args.seed), encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)", file=sys.stderr)
    if args.summary:
        print(summary(catalog))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
