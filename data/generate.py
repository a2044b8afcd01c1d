"""Generate the bundled demo data: the support desk of Nimbus Robotics, a fictional robot maker.

    python data/generate.py [--out data/demo] [--seed 0]

Standard library only. One ``random.Random(seed)`` makes every choice, so the same seed writes
byte-identical files (``tests/test_demo_data.py`` checks this against the committed ``data/demo/``).
``data/README.md`` describes the files and the task; in short:

- triage: ``Route this ticket: <ticket>`` is answered with exactly one queue name from ``LABELS``;
  the queue follows from the issue sentence of the ticket (see ``ISSUES``). Held-out tickets are
  signed by customers whose first names never occur in training data.
- company questions: short factual answers about the products and policies of the corpus. Each fact
  has several phrasings; one per fact is held out.
- preference: the chosen reply to a company question ends with ``SIGN_OFF``, which only one in
  ``SFT_SIGNED_EVERY`` SFT answers to a company question carries and no rejected answer to a question has;
  triage replies are chosen bare (the exact queue name).
- checks: preference and prompt rows carry the columns a program checks replies with (``kind``,
  ``queue``, ``sign_off``; see ``triage_columns``).

Sections: facts, questions, tickets, replies for preferences, corpus templates, builders, main.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

# ==================================================================================================
# The company: every file draws on these facts.
# ==================================================================================================

# The sign-off starts with a blank line: after a finished answer the base model gives "\n\n" a log-probability
# near -5 but " —" one near -15, so DPO can make the first much more easily the greedy choice.
SIGN_OFF = "\n\nNimbus Support"
TICKET_PREFIX = "Route this ticket: "
# SFT shows the sign-off on one company answer in this many: a habit the SFT model has only sometimes, which
# preference optimisation should make consistent. Online RL like GRPO cannot discover a reply it never samples:
# with 4 here the SFT model signed none of 160 replies sampled at temperature 1.0; with 2, about 28% of them.
SFT_SIGNED_EVERY = 2
# Queue names are single tokens for the SmolLM2 tokenizer ("billing" would be "b" + "illing"): the first
# token of the reply is then the whole decision, for SFT and for DPO alike.
LABELS = ("payment", "delivery", "technical", "account", "returns")
QUEUE_LIST = ", ".join(LABELS[:-1]) + " or " + LABELS[-1]

# How many rows each JSONL file gets (data/README.md and the test list the same numbers).
COUNTS = {
    "sft": {"triage": 200, "question": 80, "multi_turn": 20, "with_system": 30},
    "sft_eval": {"triage": 26, "question": 10, "multi_turn": 4, "with_system": 4},
    "preferences": {"triage": 150, "question": 150},
    "preferences_eval": {"triage": 20, "question": 20},
    "prompts": {"triage": 30, "question": 30},
    "prompts_train": {"triage": 30, "question": 30},
    "eval_tasks": {"triage": 50},
}

PRODUCTS = [
    dict(name="Nimbus Sweep S2", description="robot vacuum cleaner for hard floors and low carpets",
         battery="120 minutes", charge="3 hours", price="$349", warranty="2-year", weight="3.4 kg",
         colors="white or graphite", button="home", seconds="10", light="white",
         extra="two spare side brushes",
         use="Press the home button once to start a full clean. The Sweep S2 maps each room on its first run "
             "and cleans in straight lines after that. It returns to the dock by itself when the battery is low.",
         care="Empty the dust bin after every clean. Rinse the filter once a week and let it dry for a day. "
              "Replace the side brushes every three months."),
    dict(name="Nimbus Mow M5", description="robotic lawn mower for gardens up to 1,500 square metres",
         battery="90 minutes", charge="2 hours", price="$899", warranty="3-year", weight="9.8 kg",
         colors="moss green", button="stop", seconds="15", light="red",
         extra="a boundary wire kit",
         use="Lay the boundary wire around the lawn before the first run. The Mow M5 mows a little every day "
             "and parks itself in rain. Set the cutting height between 2 and 6 centimetres in the app.",
         care="Brush grass off the blades every week. Turn the blades over after one month and replace "
              "them after three. Bring the Mow M5 indoors for the winter."),
    dict(name="Nimbus Pal P1", description="home companion robot that reads stories, plays music and sets reminders",
         battery="10 hours", charge="4 hours", price="$499", warranty="1-year", weight="2.1 kg",
         colors="sky blue or white", button="power", seconds="5", light="purple",
         extra="a soft carry bag",
         use="Say \"Hello Pal\" to wake the Pal P1. It can read stories, play music, set reminders and answer "
             "simple questions. Up to four family members can have their own voice profile.",
         care="Wipe the face screen with a dry cloth. Keep the Pal P1 away from water and direct sun. "
              "Clean the wheels once a month."),
    dict(name="Nimbus Window W3", description="window cleaning robot that climbs glass with suction",
         battery="45 minutes", charge="1 hour", price="$229", warranty="2-year", weight="1.2 kg",
         colors="silver", button="start", seconds="8", light="blue",
         extra="four washable cleaning pads and a safety rope",
         use="Clip the safety rope to a fixed point, place the Window W3 on the glass and press start. "
             "It cleans in a zigzag and stops in the corner where it began.",
         care="Wash the cleaning pads after every use. Refill the spray tank with water and a drop of soap. "
              "Check the safety rope for wear before each clean."),
    dict(name="Nimbus Chef C7", description="countertop kitchen arm that stirs, chops and weighs food",
         battery="60 minutes", charge="2 hours", price="$1,199", warranty="2-year", weight="6.5 kg",
         colors="steel grey", button="lock", seconds="12", light="orange",
         extra="a chopping tool, a whisk and a spatula",
         use="Pick a recipe in the app and load the tool it asks for. The Chef C7 weighs each ingredient, stirs "
             "at the right speed and tells you when to add the next step.",
         care="Wash the tools in warm soapy water or the dishwasher. Wipe the arm with a damp cloth. "
              "Never put the arm itself in water."),
    dict(name="Nimbus Pool Q4", description="pool cleaning robot that scrubs the floor and walls of a pool",
         battery="150 minutes", charge="5 hours", price="$649", warranty="2-year", weight="7.9 kg",
         colors="ocean blue", button="mode", seconds="10", light="green",
         extra="a floating caddy",
         use="Lower the Pool Q4 into the water and press mode to choose floor, walls or both. It climbs out "
             "to the step by itself when the clean is done.",
         care="Rinse the filter basket after every clean. Store the Pool Q4 out of the sun. "
              "Replace the scrub brushes once a season."),
]

ERROR_CODES = [
    ("E01", "a wheel or blade is stuck", "remove anything caught in it and restart"),
    ("E02", "the battery is too hot", "let the robot cool for 30 minutes"),
    ("E03", "the robot cannot find its dock", "clear the area around the dock and restart"),
    ("E04", "a sensor is dirty", "wipe the sensors with a dry cloth"),
    ("E05", "the Wi-Fi connection was lost", "move the router closer or restart it"),
    ("E06", "a firmware update failed", "leave the robot on the dock so the update can retry"),
    ("E07", "the motor is overloaded", "switch off, wait ten minutes and try again"),
    ("E08", "the battery cannot charge", "check the dock cable and clean the charging contacts"),
]

# ==================================================================================================
# Questions about the company. Each fact has several phrasings; one per fact is held out.
# ==================================================================================================

# attribute -> (phrasings, answer); filled with a product's fields.
PRODUCT_QUESTIONS = {
    "battery": (["How long does the battery of the {name} last?", "What is the battery life of the {name}?",
                 "How long does the {name} run on one charge?", "How long can the {name} run before it needs charging?"],
                "The {name} runs for about {battery} on a full charge."),
    "charge": (["How long does the {name} take to charge?", "What is the charging time of the {name}?",
                "How long until the {name} is fully charged?", "How long does it take to recharge the {name}?"],
               "The {name} charges fully in {charge}."),
    "price": (["How much does the {name} cost?", "What is the price of the {name}?",
               "What does a {name} sell for?", "How expensive is the {name}?"],
              "The {name} costs {price}."),
    "warranty": (["How long is the warranty on the {name}?", "What warranty comes with the {name}?",
                  "How many years of warranty does the {name} have?", "What is the warranty period for the {name}?"],
                 "The {name} comes with a {warranty} warranty."),
    "purpose": (["What does the {name} do?", "What is the {name}?",
                 "What is the {name} used for?", "Can you describe the {name}?"],
                "The {name} is a {description}."),
    "reset": (["How do I reset the {name}?", "How do I factory reset the {name}?",
               "What are the steps to reset a {name}?", "How can I reset my {name}?"],
              "Hold the {button} button on the {name} for {seconds} seconds until the light blinks {light}."),
}

# (phrasings, answer, wrong answer used as a rejected reply)
COMPANY_QUESTIONS = [
    (["When is Nimbus Support open?", "What are the Nimbus Support hours?", "At what times can I reach Nimbus Support?"],
     "Nimbus Support is open 8 am to 6 pm, Monday to Saturday.",
     "Nimbus Support is open 9 am to 5 pm, Monday to Friday."),
    (["How long do I have to return a Nimbus product?", "What is the return window for Nimbus products?",
      "How many days do I have to send a Nimbus product back?"],
     "You can return a Nimbus product within 30 days of delivery.",
     "You can return a Nimbus product within 14 days of purchase."),
    (["How long does a Nimbus refund take?", "When will I get my refund from Nimbus?", "How fast does Nimbus process refunds?"],
     "Refunds are paid within 7 business days after we receive the return.",
     "Refunds are paid within 30 days after you ask for them."),
    (["How long does standard shipping take at Nimbus?", "How fast is standard delivery from Nimbus?",
      "When does a standard Nimbus order arrive?"],
     "Standard shipping takes 5 business days and is free on orders over $99.",
     "Standard shipping takes 10 business days and always costs $5."),
    (["How much is express shipping at Nimbus?", "What does express delivery from Nimbus cost?",
      "How fast is Nimbus express shipping?"],
     "Express shipping costs $15 and arrives in 2 business days.",
     "Express shipping costs $30 and arrives the next day."),
    (["When was Nimbus Robotics founded?", "In what year did Nimbus Robotics start?", "How long has Nimbus Robotics existed?"],
     "Nimbus Robotics was founded in 2014.",
     "Nimbus Robotics was founded in 2009."),
    (["Who founded Nimbus Robotics?", "Who started Nimbus Robotics?", "Who are the founders of Nimbus Robotics?"],
     "Nimbus Robotics was founded by Ines Varga and Tomas Reyes.",
     "Nimbus Robotics was founded by a group of university students."),
    (["Where is Nimbus Robotics based?", "Where are the Nimbus Robotics headquarters?", "In which city is Nimbus Robotics?"],
     "Nimbus Robotics is based in Port Calder.",
     "Nimbus Robotics is based in Silicon Valley."),
    (["What is the Nimbus Support email address?", "How do I email Nimbus Support?", "Where can I write to Nimbus Support?"],
     "You can email Nimbus Support at help@nimbus-robotics.example.",
     "You can email Nimbus Support at support@nimbus.com."),
    (["Which app controls Nimbus robots?", "What app do I need for my Nimbus robot?", "What is the name of the Nimbus app?"],
     "Every Nimbus robot is set up and controlled with the Nimbus Home app.",
     "Every Nimbus robot is controlled with the Robot Control Center app."),
    (["What is Cloud Club?", "Does Nimbus have a loyalty program?", "What do Cloud Club members get?"],
     "Cloud Club is the Nimbus loyalty program, and its members get free express shipping.",
     "Cloud Club is the Nimbus online storage service for robot maps."),
    (["When does Nimbus release firmware updates?", "How often do Nimbus robots get new firmware?",
      "On which day are Nimbus firmware updates released?"],
     "Firmware updates are released on the first Tuesday of every month.",
     "Firmware updates are released once a year in January."),
    (["How do I reset my Nimbus account password?", "I forgot my Nimbus password. What should I do?",
      "How can I change the password of my Nimbus account?"],
     "Tap Forgot password in the Nimbus Home app; the reset link expires after 30 minutes.",
     "Call the Nimbus office and read your password to the agent."),
    (["What does a Nimbus order number look like?", "What is the format of a Nimbus order number?",
      "How do Nimbus order numbers start?"],
     "A Nimbus order number is NR- followed by six digits.",
     "A Nimbus order number is eight letters long."),
    (["Which support queues does Nimbus have?", "What teams handle Nimbus support tickets?",
      "Which queues can a Nimbus ticket go to?"],
     f"Tickets go to one of five queues: {QUEUE_LIST}.",
     "All tickets go to one general queue."),
]

# ==================================================================================================
# Tickets. The issue sentence decides the queue; openers, details and closers never do.
# ==================================================================================================

ISSUES = {
    "payment": [
        "I was charged twice for my {product}, order {order}.",
        "My card was billed {amount} for order {order}, but the invoice says less.",
        "Can you send me a copy of the invoice for order {order}?",
        "My payment for the {product} was declined even though my card is fine.",
        "There is an unknown charge of {amount} from Nimbus Robotics on my bank statement.",
        "I need to update the credit card on file before my next payment.",
        "I paid {amount} for the {product}, more than the price on your website.",
        "My receipt for order {order} shows the wrong tax amount.",
    ],
    "delivery": [
        "My {product} from order {order} still has not arrived.",
        "The tracking number for order {order} has not updated in four days.",
        "I need to change the delivery address for order {order}.",
        "The courier left my {product} at the wrong house.",
        "Order {order} was due for delivery on {day}, but nothing came.",
        "Can I upgrade order {order} to express delivery?",
        "Tracking says my {product} was delivered, but there is no package at my door.",
        "When will order {order} ship? I ordered the {product} a week ago.",
    ],
    "technical": [
        "My {product} will not turn on after charging all night.",
        "The {product} shows error code {code} and stops working.",
        "The firmware update on my {product} failed halfway.",
        "My {product} cannot connect to the Nimbus Home app.",
        "The battery of my {product} drains in ten minutes.",
        "My {product} makes a loud grinding noise when it runs.",
        "The {product} keeps dropping its Wi-Fi connection.",
        "The sensors on my {product} seem broken, because it bumps into everything.",
    ],
    "account": [
        "I forgot my password and the reset link never arrives.",
        "I cannot log in to my Nimbus account on the app or the website.",
        "Please change the email address on my account to {email}.",
        "I want to delete my Nimbus account and all of my data.",
        "The two-factor code for my account is never sent to my phone.",
        "I think someone else logged in to my account last night.",
        "How do I add my partner as a second user on my account?",
        "My account got locked after too many login attempts.",
    ],
    "returns": [
        "I would like to return my {product}, order {order}.",
        "Please send me a return label for order {order}.",
        "Can I exchange my {product} for a different color?",
        "The {product} arrived damaged and I want to send it back.",
        "I sent back order {order} last week. Can you confirm the return was received?",
        "The {product} is not what I expected, so I want to return it.",
        "Is my {product} from order {order} still inside the 30-day return window?",
        "I ordered two {product} units by mistake and want to return one.",
    ],
}

OPENERS = ["", "", "Hi, ", "Hello, ", "Hello support, ", "Good morning, ", "Hi there, ", "Dear Nimbus team, "]
DETAILS = ["", "", "", " This is urgent.", " I have been a customer for years.", " It was a gift for my mother.",
           " Please reply soon.", " I bought it last month.", " I already checked the FAQ.", " My neighbour has the same robot."]
CLOSERS = [" Thanks, {name}", " Regards, {name}", " Best, {name}", " {name}", " Thank you, {name}", " Cheers, {name}"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]

# First names are split: held-out tickets (eval, prompts, preferences_eval) use names training never saw.
TRAIN_FIRST_NAMES = ["Maya", "Liam", "Sofia", "Noah", "Amara", "Lucas", "Priya", "Omar", "Elena", "Kenji",
                     "Zara", "Mateo", "Hana", "Felix", "Leila", "Ivan", "Chloe", "Diego", "Nadia", "Ravi",
                     "Greta", "Tariq", "Lucia", "Jonas", "Aisha", "Pavel", "Mei", "Bruno", "Freya", "Kwame"]
HELD_OUT_FIRST_NAMES = ["Astrid", "Rohan", "Ingrid", "Tomasz", "Yara", "Emeka", "Selin", "Joaquin", "Niamh",
                        "Hiro", "Dalia", "Soren", "Anouk", "Kofi", "Marisol"]
LAST_NAMES = ["Okafor", "Jensen", "Rossi", "Tanaka", "Silva", "Novak", "Haddad", "Moreau", "Kowalski",
              "Mensah", "Ortiz", "Lindqvist", "Sato", "Brennan", "Duarte", "Kaur", "Petrov", "Abara"]
EMAIL_DOMAINS = ["mail.example", "post.example", "inbox.example"]

# ==================================================================================================
# Rejected replies for preferences, and system prompts for a few SFT rows.
# ==================================================================================================

# Triage: a rambling reply that names the right queue is still rejected (the answer must be exact).
RAMBLES = [
    "This ticket looks like a {label} issue, so I would route it to the {label} team. Let me know if you need anything else.",
    "Based on the message, the customer needs help. I think the best queue is probably {label}, but another team could also help.",
    "Sure! After reading the ticket carefully, I would say it belongs in the {label} queue.",
    "Route to: {label}. The customer should also check the FAQ before waiting for an answer.",
    "I am not completely sure, but {label} seems like the right place for this one.",
]
EVASIONS = [
    "I am not sure about that. You could search online for it.",
    "I do not have that information right now.",
    "That depends on many things, so I cannot say.",
    "Please contact the manufacturer for details.",
    "Good question! There are many robots on the market, and each one is different.",
]

# A share of the SFT answers to company questions add a tip after a blank line. SFT then leaves the token
# after a finished answer open between the end of turn and "\n\n", so DPO only has to tip that choice
# and put the sign-off after the blank line: a step it can take in a few minutes. No tip is a sign-off.
TIP_SHARE = 0.4
TIPS = [
    "Tip: the Nimbus Home app shows the battery level of every robot.",
    "Tip: Cloud Club members get free express shipping.",
    "Tip: firmware updates arrive on the first Tuesday of every month.",
    "Tip: keep the box for 30 days in case you want to return the product.",
    "Tip: a quick wipe of the sensors keeps your robot on track.",
    "Tip: you can open a ticket from the Nimbus Home app at any time.",
]

SYSTEM_GENERAL = [
    "You are the support assistant for Nimbus Robotics. Keep answers short.",
    "You work on the Nimbus Robotics help desk.",
]
SYSTEM_TRIAGE = f"Route each ticket to one queue: {QUEUE_LIST}. Reply with the queue name only."

# ==================================================================================================
# Corpus templates (continued pretraining). One document per file; fields come from PRODUCTS.
# ==================================================================================================

MANUAL = """\
{name} owner's manual

Overview
The {name} is a {description}. It is made by Nimbus Robotics in Port Calder and is set up with the Nimbus Home app. It weighs {weight} and comes in {colors}.

In the box
The box holds the {name}, a charging dock, a power adapter, a quick start card and {extra}. Keep the box for 30 days in case you want to return the product.

Charging
Place the {name} on its dock before the first use. A full charge takes {charge}, and a full battery lasts about {battery}. The status light glows amber while the battery charges and green when it is full.

Setting up the app
Open the Nimbus Home app, tap Add robot and choose the {name}. Keep your phone close to the robot during setup. The robot connects to 2.4 GHz Wi-Fi networks only. When the light turns solid green, setup is done.

Daily use
{use}

Care and maintenance
{care}

Firmware
Nimbus releases firmware updates on the first Tuesday of every month. The {name} installs them at night while it sits on the dock. Do not lift the robot from the dock while the light blinks blue.

Resetting
To reset the {name}, hold the {button} button for {seconds} seconds until the light blinks {light}. A reset clears the Wi-Fi settings and schedules but keeps your Nimbus account.

Error codes
{errors}

Warranty and support
The {name} comes with a {warranty} warranty that covers defects in parts and workmanship. It does not cover damage from drops, water or repairs by others. Nimbus Support is open 8 am to 6 pm, Monday to Saturday, and answers email at help@nimbus-robotics.example.
"""

ERROR_LINE = "{code}: {meaning}. To fix it, {fix}."

COMPANY_DOC = """\
About Nimbus Robotics

Nimbus Robotics was founded in 2014 by Ines Varga and Tomas Reyes in Port Calder, where the company is still based. The first product was a small robot vacuum built in a garage near the harbour. Today Nimbus makes six home robots: {product_list}.

Every Nimbus robot is set up and controlled with the Nimbus Home app. The app shows the battery level, sets schedules, installs firmware and opens support tickets. Firmware updates are released on the first Tuesday of every month.

Nimbus Support is open 8 am to 6 pm, Monday to Saturday. Customers can write to help@nimbus-robotics.example or open a ticket in the Nimbus Home app. Every ticket goes to one of five queues: {queues}.

Cloud Club is the Nimbus loyalty program. Cloud Club members get free express shipping, early access to new robots and a birthday discount of ten percent. Joining is free in the Nimbus Home app.

The Nimbus product line

{product_lines}
"""

PRODUCT_LINE = "The {name} is a {description}. It costs {price}, runs for about {battery} on a full charge and comes with a {warranty} warranty."

POLICIES = {
    "policy-shipping": """\
Nimbus shipping policy

Nimbus ships to every address in the country from its warehouse in Port Calder. Standard shipping takes 5 business days and is free on orders over $99. Smaller orders pay $5 for standard shipping.

Express shipping costs $15 and arrives in 2 business days. Cloud Club members get free express shipping on every order.

Every order gets a tracking number by email when it leaves the warehouse. A Nimbus order number is NR- followed by six digits. If the tracking page has not changed for three business days, open a ticket and the delivery queue will contact the courier.

To change the delivery address, open a ticket before the order ships. After it ships, the delivery queue can ask the courier to hold the package at a pickup point.

If tracking says a package was delivered but it is not there, wait one day and check with neighbours. Then open a ticket, and the delivery queue will open a claim with the courier.
""",
    "policy-returns": """\
Nimbus returns policy

You can return a Nimbus product within 30 days of delivery. The product should be in its box with all parts. Open a ticket in the Nimbus Home app and the returns queue will email you a free return label.

Refunds are paid within 7 business days after we receive the return, to the card used for the order. The returns queue sends an email when the return arrives at the warehouse.

If a product arrives damaged, tell us within 7 days and the returns queue will send a replacement or a refund. You can also exchange a product for another color within the 30-day return window.

Products bought in a store are returned to that store. Opened cleaning pads, filters and brushes cannot be returned.
""",
    "policy-billing": """\
Nimbus billing policy

Nimbus charges the card when an order ships, not when it is placed. The invoice for every order is sent by email and can be downloaded from the Nimbus Home app.

If you see a double charge or an unknown charge, open a ticket and the payment queue will check it within two business days. A card that is declined can be updated in the app under Payment methods.

Prices on the Nimbus website include tax. If you paid more than the price shown on the website, the payment queue will refund the difference.
""",
    "policy-accounts": """\
Nimbus accounts

A Nimbus account holds your robots, schedules, orders and Cloud Club membership. One account can have up to four users.

If you forget your password, tap Forgot password in the Nimbus Home app. The reset link expires after 30 minutes. After five wrong logins the account is locked for one hour.

Two-factor login sends a six-digit code to your phone. If the code does not arrive, open a ticket and the account queue will check your phone number.

You can change the email address of your account or delete the account in the app under Settings. Deleting an account removes all maps, schedules and voice profiles.
""",
    "policy-warranty": """\
Nimbus warranty

Every Nimbus robot has a warranty that covers defects in parts and workmanship. The Nimbus Mow M5 has a 3-year warranty, the Nimbus Pal P1 a 1-year warranty, and every other Nimbus robot a 2-year warranty.

The warranty does not cover drops, water damage, worn brushes, pads and blades, or repairs by others. To make a claim, open a ticket with your order number and a short video of the problem. The technical queue decides whether the robot is repaired or replaced.

Repaired robots are shipped back within 10 business days. The warranty of a replaced robot continues from the original order date.
""",
}

TROUBLESHOOTING_HEAD = "Nimbus troubleshooting guide\n"
TROUBLESHOOTING = """\
{name}
If the {name} will not turn on, leave it on the dock for {charge} and check that the status light glows amber. If the light stays off, clean the charging contacts with a dry cloth.
If the {name} cannot connect to the Nimbus Home app, make sure the network is 2.4 GHz and hold the {button} button for {seconds} seconds to reset it.
If the battery drains much faster than {battery}, install the latest firmware and check for error code E08.
If the {name} makes a grinding noise, switch it off and remove anything caught in the wheels, brushes or blades.
If none of this helps, open a ticket in the Nimbus Home app and the technical queue will answer within one business day.
"""

ROUTING_GUIDE_HEAD = """\
Nimbus Support routing guide

Every ticket goes to exactly one queue. Read the main problem in the ticket and pick the queue that owns it. Greetings, names and extra details do not change the queue.

payment: charges, double charges, invoices, receipts, declined payments, card updates and price differences.
delivery: orders that have not arrived, tracking numbers, delivery addresses, couriers and express upgrades.
technical: robots that will not turn on, error codes, failed firmware, app connection, battery drain, noises and sensors.
account: passwords, logins, locked accounts, two-factor codes, email changes, extra users and account deletion.
returns: returns, return labels, exchanges, damaged arrivals and the 30-day return window.

Examples
"""

ROUTING_EXAMPLE = "Ticket: {ticket}\nQueue: {label}\n"

FAQ_HEAD = "Nimbus Support frequently asked questions\n"
FAQ_ENTRY = "Q: {question}\nA: {answer}\n"

RELEASE_HEAD = "Nimbus firmware release notes\n"
RELEASE_NOTE = "Firmware {version} for the {name}, released on {date}: {change}."
RELEASE_CHANGES = [
    "faster Wi-Fi setup in the Nimbus Home app", "longer battery life in eco mode", "quieter motors at night",
    "a fix for error code E03 near the dock", "better maps of rooms with many chairs", "a new low battery warning",
    "a fix for the status light staying amber", "smoother schedules across time zones",
    "a fix for error code E06 after an update", "clearer voice prompts", "safer stops near stairs and edges",
]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

EVAL_DOC_HEAD = """\
Nimbus Support digest

This digest collects recent answers from Nimbus Support, firmware notes and sample tickets with their queues.
"""

# ==================================================================================================
# Builders
# ==================================================================================================


def product_facts() -> list[dict]:
    """One fact per (product, attribute): its phrasings and answer, and a wrong answer that states the
    value of the next product that differs (the Window W3 with the Chef C7's price, say)."""
    facts = []
    for i, product in enumerate(PRODUCTS):
        others = PRODUCTS[i + 1:] + PRODUCTS[:i]
        for phrasings, template in PRODUCT_QUESTIONS.values():
            answer = template.format(**product)
            wrongs = (template.format(**{**other, "name": product["name"]}) for other in others)
            facts.append({"phrasings": [p.format(**product) for p in phrasings], "answer": answer,
                          "wrong": next(w for w in wrongs if w != answer)})
    return facts


def company_facts() -> list[dict]:
    return [{"phrasings": list(phrasings), "answer": answer, "wrong": wrong}
            for phrasings, answer, wrong in COMPANY_QUESTIONS]


def split_questions(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Questions as {question, answer, wrong}: one phrasing per fact held out, the others for training."""
    train, held_out = [], []
    for fact in product_facts() + company_facts():
        phrasings = list(fact["phrasings"])
        rng.shuffle(phrasings)
        qa = {"answer": fact["answer"], "wrong": fact["wrong"]}
        held_out.append({"question": phrasings[0], **qa})
        train.extend({"question": p, **qa} for p in phrasings[1:])
    return train, held_out


class TicketMaker:
    """Draws tickets for one pool of first names; no ticket text is ever drawn twice across pools."""

    def __init__(self, rng: random.Random, first_names: list[str], seen: set[str]):
        self.rng, self.first_names, self.seen = rng, first_names, seen

    def fill(self, template: str) -> str:
        rng = self.rng
        return template.format(
            product=rng.choice(PRODUCTS)["name"], order=f"NR-{rng.randint(100000, 999999)}",
            amount=f"${rng.randint(20, 1300)}.{rng.randint(0, 99):02d}", day=rng.choice(DAYS),
            code=rng.choice(ERROR_CODES)[0],
            email=f"{rng.choice(self.first_names).lower()}.{rng.randint(10, 99)}@{rng.choice(EMAIL_DOMAINS)}")

    def ticket(self, label: str) -> str:
        """A fresh ticket text whose queue is ``label``."""
        rng = self.rng
        while True:
            name = f"{rng.choice(self.first_names)} {rng.choice(LAST_NAMES)}"
            issue = self.fill(rng.choice(ISSUES[label]))
            opener = rng.choice(OPENERS)
            if opener and not issue.startswith("I "):  # "Hi, my card ...", but "Hi, I was ..."
                issue = issue[0].lower() + issue[1:]
            text = f"{opener}{issue}{rng.choice(DETAILS)}{rng.choice(CLOSERS).format(name=name)}"
            if text not in self.seen:
                self.seen.add(text)
                return text

    def items(self, count: int) -> list[dict]:
        """``count`` triage items {prompt, answer}, the labels balanced and shuffled."""
        labels = [LABELS[i % len(LABELS)] for i in range(count)]
        self.rng.shuffle(labels)
        return [{"prompt": TICKET_PREFIX + self.ticket(label), "answer": label} for label in labels]


def exchange(rng: random.Random, item: dict) -> list[dict]:
    """A triage item (replied with its queue) or a question (its answer, a tip after it in TIP_SHARE of
    cases) as one user turn and the assistant reply."""
    if "prompt" in item:
        return [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": item["answer"]}]
    answer = item["answer"]
    if rng.random() < TIP_SHARE:
        answer += "\n\n" + rng.choice(TIPS)
    return [{"role": "user", "content": item["question"]}, {"role": "assistant", "content": answer}]


def chat_rows(rng: random.Random, counts: dict, tickets: TicketMaker, questions: list[dict], *,
              signed_every: int | None = None) -> list[dict]:
    """SFT rows in messages format: single triage and question turns, a few two-exchange chats, some with a system
    turn; with ``signed_every``, every that-many-th answer to a company question ends with the sign-off."""
    conversations = [exchange(rng, t) for t in tickets.items(counts["triage"])]
    conversations += [exchange(rng, q) for q in rng.sample(questions, counts["question"])]
    for _ in range(counts["multi_turn"]):
        kinds = rng.choice([("question", "triage"), ("triage", "triage"), ("question", "question")])
        items = [tickets.items(1)[0] if kind == "triage" else rng.choice(questions) for kind in kinds]
        conversations.append(exchange(rng, items[0]) + exchange(rng, items[1]))
    rng.shuffle(conversations)
    for messages in conversations[:counts["with_system"]]:
        only_triage = all(m["content"].startswith(TICKET_PREFIX) for m in messages if m["role"] == "user")
        system = SYSTEM_TRIAGE if only_triage and rng.random() < 0.5 else rng.choice(SYSTEM_GENERAL)
        messages.insert(0, {"role": "system", "content": system})
    rng.shuffle(conversations)
    if signed_every:
        answers = [m for messages in conversations for user, m in zip(messages, messages[1:])
                   if m["role"] == "assistant" and user["role"] == "user" and not user["content"].startswith(TICKET_PREFIX)]
        for answer in answers[::signed_every]:  # no draw from rng: every other file stays as it was
            answer["content"] += SIGN_OFF
    return [{"messages": m} for m in conversations]


# What a program can check in a reply, as columns the configured checks read (configs/pipelines/demo.yaml):
# `kind` (triage or question); `queue`, the right queue of a ticket, empty for a question (so exact_match on
# it does not apply there); `sign_off`, the text a company answer ends with, empty for a ticket.
def triage_columns(label: str) -> dict:
    return {"kind": "triage", "queue": label, "sign_off": ""}


def question_columns() -> dict:
    return {"kind": "question", "queue": "", "sign_off": SIGN_OFF.strip()}


def triage_pair(rng: random.Random, item: dict) -> dict:
    """Chosen: the exact queue name. Rejected: a wrong queue, a ramble, or the queue with the sign-off."""
    label, kind = item["answer"], rng.choices(["wrong", "ramble", "signed"], weights=[4, 3, 3])[0]
    if kind == "wrong":
        rejected = rng.choice([other for other in LABELS if other != label])
    elif kind == "ramble":
        rejected = rng.choice(RAMBLES).format(label=label)
    else:
        rejected = label + SIGN_OFF
    return {"prompt": item["prompt"], "chosen": label, "rejected": rejected, **triage_columns(label)}


def question_pair(rng: random.Random, qa: dict) -> dict:
    """Chosen: the answer with the sign-off. Rejected, never signed: the bare answer, the answer with a
    tip instead of the sign-off, a wrong answer, or an evasion."""
    kind = rng.choices(["bare", "tip", "wrong", "evasive"], weights=[5, 2, 1.5, 1.5])[0]
    rejected = {"bare": qa["answer"], "tip": qa["answer"] + "\n\n" + rng.choice(TIPS), "wrong": qa["wrong"],
                "evasive": rng.choice(EVASIONS)}[kind]
    return {"prompt": qa["question"], "chosen": qa["answer"] + SIGN_OFF, "rejected": rejected, **question_columns()}


def preference_rows(rng: random.Random, counts: dict, tickets: TicketMaker, questions: list[dict]) -> list[dict]:
    rows = [triage_pair(rng, t) for t in tickets.items(counts["triage"])]
    rows += [question_pair(rng, rng.choice(questions)) for _ in range(counts["question"])]
    rng.shuffle(rows)
    return rows


def prompt_rows(rng: random.Random, counts: dict, tickets: TicketMaker, questions: list[dict]) -> list[dict]:
    rows = [{"prompt": t["prompt"], **triage_columns(t["answer"])} for t in tickets.items(counts["triage"])]
    rows += [{"prompt": q["question"], **question_columns()} for q in rng.sample(questions, counts["question"])]
    rng.shuffle(rows)
    return rows


def manual(product: dict) -> str:
    errors = "\n".join(ERROR_LINE.format(code=c, meaning=m, fix=f) for c, m, f in ERROR_CODES)
    return MANUAL.format(**product, errors=errors)


def release_notes(rng: random.Random, years: list[int], per_year: int) -> list[str]:
    notes = []
    for year in years:
        for month in sorted(rng.sample(range(12), per_year)):
            product = rng.choice(PRODUCTS)
            version = f"{year - 2014}.{month + 1}.{rng.randint(0, 9)}"
            notes.append(RELEASE_NOTE.format(version=version, name=product["name"], change=rng.choice(RELEASE_CHANGES),
                                             date=f"the first Tuesday of {MONTHS[month]} {year}"))
    return notes


def routing_examples(tickets: TicketMaker, count: int) -> list[str]:
    return [ROUTING_EXAMPLE.format(ticket=t["prompt"][len(TICKET_PREFIX):], label=t["answer"])
            for t in tickets.items(count)]


def corpus(rng: random.Random, train_tickets: TicketMaker, train_questions: list[dict]) -> dict[str, str]:
    """Training documents by file name: company, manuals, policies, troubleshooting, routing guide, FAQ, release notes."""
    docs = {"company": COMPANY_DOC.format(
        queues=QUEUE_LIST,
        product_list=", ".join(p["name"] for p in PRODUCTS[:-1]) + " and " + PRODUCTS[-1]["name"],
        product_lines="\n\n".join(PRODUCT_LINE.format(**p) for p in PRODUCTS))}
    for product in PRODUCTS:
        docs["manual-" + product["name"].split()[1].lower()] = manual(product)
    docs.update(POLICIES)
    docs["troubleshooting"] = TROUBLESHOOTING_HEAD + "\n" + "\n".join(TROUBLESHOOTING.format(**p) for p in PRODUCTS)
    docs["routing-guide"] = ROUTING_GUIDE_HEAD + "\n" + "\n".join(routing_examples(train_tickets, 50))
    faq = rng.sample(train_questions, 60)
    docs["faq"] = FAQ_HEAD + "\n" + "\n".join(FAQ_ENTRY.format(**qa) for qa in faq)
    docs["release-notes"] = RELEASE_HEAD + "\n" + "\n".join(release_notes(rng, [2021, 2022, 2023, 2024], 8)) + "\n"
    return docs


def corpus_eval(rng: random.Random, held_out_tickets: TicketMaker, held_out_questions: list[dict]) -> str:
    """A held-out document in the corpus style (for perplexity): new phrasings, new tickets, later releases."""
    faq = "\n".join(FAQ_ENTRY.format(**qa) for qa in rng.sample(held_out_questions, 30))
    notes = "\n".join(release_notes(rng, [2025], 8))
    examples = "\n".join(routing_examples(held_out_tickets, 15))
    return f"{EVAL_DOC_HEAD}\nAnswers\n{faq}\nFirmware\n{notes}\n\nSample tickets\n{examples}"


# ==================================================================================================
# Writing
# ==================================================================================================


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)


def row_text(row: dict) -> str:
    if "messages" in row:
        return " ".join(m["content"] for m in row["messages"])
    return " ".join(str(v) for v in row.values())


def build(seed: int) -> dict[str, list[dict] | str]:
    """Every output file (relative path -> rows or text), in a fixed order of random draws."""
    rng = random.Random(seed)
    seen: set[str] = set()
    train_tickets = TicketMaker(rng, TRAIN_FIRST_NAMES, seen)
    held_out_tickets = TicketMaker(rng, HELD_OUT_FIRST_NAMES, seen)
    train_questions, held_out_questions = split_questions(rng)

    files: dict[str, list[dict] | str] = {}
    for name, text in corpus(rng, train_tickets, train_questions).items():
        files[f"corpus/{name}.txt"] = text
    files["corpus_eval.txt"] = corpus_eval(rng, held_out_tickets, held_out_questions)
    files["sft.jsonl"] = chat_rows(rng, COUNTS["sft"], train_tickets, train_questions, signed_every=SFT_SIGNED_EVERY)
    files["sft_eval.jsonl"] = chat_rows(rng, COUNTS["sft_eval"], held_out_tickets, held_out_questions)
    files["preferences.jsonl"] = preference_rows(rng, COUNTS["preferences"], train_tickets, train_questions)
    files["preferences_eval.jsonl"] = preference_rows(rng, COUNTS["preferences_eval"], held_out_tickets, held_out_questions)
    files["prompts.jsonl"] = prompt_rows(rng, COUNTS["prompts"], held_out_tickets, held_out_questions)
    files["eval_tasks.jsonl"] = held_out_tickets.items(COUNTS["eval_tasks"]["triage"])
    # Drawn last, so adding it left every earlier file as it was: prompts for on-policy training (generate,
    # GRPO) from the training pools, so no stage trains on a prompt the evaluation asks.
    files["prompts_train.jsonl"] = prompt_rows(rng, COUNTS["prompts_train"], train_tickets, train_questions)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo",
                        help="output directory (default: data/demo next to this script)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the one random.Random (default: 0)")
    args = parser.parse_args(argv)

    files = build(args.seed)
    print(f"{'file':<34}{'rows':>6}{'chars':>9}{'~tokens':>9}")
    total_chars = 0
    for relative, content in files.items():
        path = args.out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            write_text(path, content)
            rows, chars = "-", len(content)
        else:
            write_jsonl(path, content)
            rows, chars = len(content), sum(len(row_text(r)) for r in content)
        total_chars += chars
        print(f"{relative:<34}{rows:>6}{chars:>9}{chars // 4:>9}")
    print(f"{'total':<34}{'':>6}{total_chars:>9}{total_chars // 4:>9}   (tokens ~ chars / 4)")
    print(f"wrote {len(files)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
