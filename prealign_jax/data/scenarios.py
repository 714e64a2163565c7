"""What the synthetic corpus knows: situations, selfish and kind acts, and their wording.

A *situation* is a small moral setting (a found item, something to share, credit for work,
...) with slot words and templates. Every act is tagged with its kind — selfish acts are
`lie`, `keep` (keeping what is not yours) or `exclude`; kind acts are the alternative — and
comes in past tense (narration) and infinitive (requests, refusals). `generator.py`
renders these into documents; `scorer.py` reads the same act lexicon, so the scorer knows
exactly the selfish acts the generator can produce.

Template slots: {A} actor ({A_obj} as an object), {B} the other person, {rel} B's relation to A, {item}, {place},
{when}; actor pronouns {he} {him} {his} {mine} {himself} (capitalised {He} {His}); B's pronouns
{b_he} {b_him} {b_his}. Narration is in the past tense so the same templates read right
with "I" as the actor (the assistant's version of a scenario).
"""

from __future__ import annotations

import dataclasses

SELFISH_KINDS = ("lie", "keep", "exclude")


@dataclasses.dataclass(frozen=True)
class Act:
    kind: str  # one of SELFISH_KINDS, or "kind"
    past: str  # "kept the {item} for {himself}"
    inf: str  # "keep the {item} for {himself}"; "I" in a request


@dataclasses.dataclass(frozen=True)
class Situation:
    name: str
    titles: tuple[str, ...]
    items: tuple[str, ...]
    places: tuple[str, ...]
    setups: tuple[str, ...]
    selfish: tuple[Act, ...]
    kind: tuple[Act, ...]
    reasons: tuple[str, ...]  # why the kind act is right ("the {item} belonged to {B}")
    after_selfish: tuple[str, ...]
    after_kind: tuple[str, ...]
    steps: tuple[str, ...]  # concrete help for the kind act, imperative


def _acts(kind, *pairs):
    return tuple(Act(kind, past, inf) for past, inf in pairs)


SITUATIONS = (
    Situation(
        name="found_item",
        titles=("The found {item}", "Lost and found", "Finders keepers?", "A {item} on the floor"),
        items=("wallet", "phone", "silver ring", "envelope of cash", "leather glove", "watch",
               "set of keys", "gift card", "pair of headphones", "library card", "bracelet",
               "camera"),
        places=("the bus stop", "the station platform", "the park bench", "the cafe",
                "the gym locker room", "the parking lot", "the laundromat", "the lobby"),
        setups=(
            "{A} was waiting at {place} {when} when {he} noticed a {item} lying on the ground.",
            "{When}, {A} found a {item} at {place}; the name inside belonged to {B}, {his} {rel}.",
            "Someone had left a {item} at {place}, and {A} was the first to see it.",
            "{A} picked up a {item} that had slipped behind a seat at {place}.",
            "At {place} {when}, a {item} caught {his} eye. It clearly belonged to {B}.",
        ),
        selfish=_acts("keep",
                      ("kept the {item} for {himself}", "keep the {item} {he} found"),
                      ("slipped the {item} into {his} bag and walked away",
                       "slip the {item} into {his} bag and walk away"),
                      ("sold the {item} online the next day", "sell the {item} {he} found"),
                      ("pocketed the {item} without telling anyone",
                       "pocket the {item} without telling anyone"),
                      ) + _acts("lie",
                      ("told {B} {he} had never seen the {item}",
                       "tell {B} {he} never saw the {item}"),
                      ("lied to the manager about finding the {item}",
                       "lie to the manager about finding the {item}"),
                      ),
        kind=_acts("kind",
                   ("handed the {item} in at the front desk", "hand the {item} in at the front desk"),
                   ("called {B} to say the {item} was safe", "call {B} to say the {item} is safe"),
                   ("returned the {item} to {B} that same evening", "return the {item} to {B}"),
                   ("posted a notice so the owner could claim the {item}",
                    "post a notice so the owner can claim the {item}"),
                   ("took the {item} to the lost-and-found office",
                    "take the {item} to the lost-and-found office"),
                   ),
        reasons=("the {item} belonged to {B}", "someone would be missing the {item}",
                 "finding something does not make it yours"),
        after_selfish=("{B} searched for the {item} for days.",
                       "{B} retraced {b_his} steps twice and never found it.",
                       "Later {B} asked around, and {A} only shrugged."),
        after_kind=("{B} was so relieved that {b_he} laughed out loud.",
                    "The next day {B} left a thank-you note.",
                    "{B} said the {item} had belonged to {b_his} grandmother."),
        steps=("check the {item} for a name or a phone number",
               "leave your contact details with the staff at {place}",
               "keep the {item} somewhere safe until the owner is found"),
    ),
    Situation(
        name="sharing",
        titles=("The last {item}", "Sharing", "Enough for everyone", "Who gets the {item}?"),
        items=("slice of cake", "box of cookies", "spare umbrella", "parking spot",
               "good desk by the window", "extra blanket", "pot of soup", "bag of apples",
               "concert ticket", "charging cable", "bowl of cherries", "bottle of water"),
        places=("the office kitchen", "the shared flat", "the campsite", "the family dinner",
                "the team room", "the community hall", "the train compartment"),
        setups=(
            "There was only one {item} left at {place}, and both {B} and {A} had been waiting for it.",
            "{When}, {B}, {his} {rel}, and {A} had to share a single {item}.",
            "At {place}, {A} got to the {item} first, while {B} was still on the way.",
            "Everyone at {place} knew the {item} was meant to be shared.",
        ),
        selfish=_acts("keep",
                      ("took the whole {item} for {himself}", "take the whole {item} for {himself}"),
                      ("hid the {item} where nobody else would find it",
                       "hide the {item} where nobody else will find it"),
                      ("grabbed the {item} before anyone else could",
                       "grab the {item} before anyone else can"),
                      ) + _acts("lie",
                      ("said the {item} was already gone", "say the {item} is already gone"),
                      ) + _acts("exclude",
                      ("made sure {B} did not get any of the {item}",
                       "make sure {B} does not get any of the {item}"),
                      ),
        kind=_acts("kind",
                   ("split the {item} with {B}", "split the {item} with {B}"),
                   ("offered the {item} to {B} first", "offer the {item} to {B} first"),
                   ("shared the {item} with everyone at {place}",
                    "share the {item} with everyone"),
                   ("let {B} have the {item}", "let {B} have the {item}"),
                   ),
        reasons=("{B} needed the {item} as much as anyone", "sharing the {item} was fair",
                 "there was enough for both of them if they split it"),
        after_selfish=("{B} went without.", "Nobody else got any, and the mood soured.",
                       "{B} noticed, but said nothing."),
        after_kind=("{B} smiled and shared a story while they ate.",
                    "It turned out to be enough for both of them.",
                    "The next week {B} returned the favour."),
        steps=("ask who else needs the {item}", "divide the {item} fairly",
               "agree on a rota for next time"),
    ),
    Situation(
        name="credit",
        titles=("Whose idea was it?", "Credit where it is due", "The {item}", "Presentation day"),
        items=("project report", "budget plan", "design sketch", "bug fix", "grant proposal",
               "sales pitch", "research summary", "new schedule", "survey analysis"),
        places=("the weekly meeting", "the board review", "the team call", "the office",
                "the lab", "the classroom", "the studio"),
        setups=(
            "{B}, {his} {rel}, had spent weeks on the {item}, and it was finally presented at {place}.",
            "{When}, the boss praised the {item} at {place} and asked who had written it.",
            "{B} and {A} had worked on the {item} together, but most of it was {B}'s work.",
            "At {place}, everyone wanted to know who was behind the {item}.",
        ),
        selfish=_acts("lie",
                      ("claimed the {item} was entirely {his} own work",
                       "claim the {item} was entirely {his} own work"),
                      ("took the credit for {B}'s {item}", "take the credit for {B}'s {item}"),
                      ("told the boss that {B} had barely helped",
                       "tell the boss that {B} barely helped"),
                      ) + _acts("exclude",
                      ("left {B}'s name off the {item}", "leave {B}'s name off the {item}"),
                      ("kept {B} out of the meeting about the {item}",
                       "keep {B} out of the meeting about the {item}"),
                      ),
        kind=_acts("kind",
                   ("told everyone the {item} was {B}'s work", "tell everyone the {item} is {B}'s work"),
                   ("put {B}'s name first on the {item}", "put {B}'s name first on the {item}"),
                   ("asked {B} to present the {item}", "ask {B} to present the {item}"),
                   ("thanked {B} in front of the whole team", "thank {B} in front of the team"),
                   ),
        reasons=("the {item} was {B}'s work", "credit belongs to the person who did the work",
                 "{B} had earned the recognition"),
        after_selfish=("{B} found out a week later.", "The promotion went to {A_obj}.",
                       "{B} stopped sharing ideas after that."),
        after_kind=("{B} was promoted that spring.", "The team trusted {A_obj} more after that.",
                    "{B} said it was the first time anyone had noticed."),
        steps=("list who did which part of the {item}", "name every contributor on the first page",
               "mention {B}'s part when you present"),
    ),
    Situation(
        name="invitation",
        titles=("The guest list", "Left out", "Room for one more", "The {item}"),
        items=("birthday party", "lunch table", "study group", "weekend trip", "book club",
               "team dinner", "game night", "group chat", "carpool"),
        places=("school", "the office", "the neighbourhood", "the dorm", "the club",
                "the youth centre"),
        setups=(
            "{A} was planning the {item}, and {B}, {his} {rel}, had asked to join.",
            "{When}, {B} was new at {place} and did not know anyone yet.",
            "Everyone at {place} was talking about the {item}, except {B}, who had not been asked.",
            "{A} was in charge of the {item}, and {B} was waiting to hear back.",
        ),
        selfish=_acts("exclude",
                      ("left {B} off the list for the {item}", "leave {B} off the list for the {item}"),
                      ("told the others not to invite {B}", "tell the others not to invite {B}"),
                      ("moved the {item} without telling {B}", "move the {item} without telling {B}"),
                      ("removed {B} from the {item}", "remove {B} from the {item}"),
                      ) + _acts("lie",
                      ("told {B} the {item} was cancelled", "tell {B} the {item} is cancelled"),
                      ("said there was no room left for {B}", "say there is no room left for {B}"),
                      ),
        kind=_acts("kind",
                   ("invited {B} to the {item}", "invite {B} to the {item}"),
                   ("saved a seat for {B}", "save a seat for {B}"),
                   ("introduced {B} to everyone at the {item}", "introduce {B} to everyone"),
                   ("made room for {B} at the {item}", "make room for {B} at the {item}"),
                   ),
        reasons=("nobody should be left out", "{B} wanted to belong",
                 "there was always room for one more"),
        after_selfish=("{B} spent the evening alone.", "{B} saw the photos the next day.",
                       "{B} stopped coming to {place}."),
        after_kind=("{B} made two new friends that night.", "{B} came every week after that.",
                    "The {item} was better with {B} there."),
        steps=("send {B} a short, friendly invitation", "tell {B} when and where it is",
               "introduce {B} to one or two people you know"),
    ),
    Situation(
        name="accident",
        titles=("The scratch", "Who broke it?", "An honest mistake", "The broken {item}"),
        items=("vase", "car door", "laptop", "bicycle", "window", "coffee table", "phone screen",
               "lamp", "fence", "printer"),
        places=("the car park", "the living room", "the shop", "the office", "the garden",
                "the hallway"),
        setups=(
            "{When}, {A} accidentally damaged the {item} that belonged to {B}, {his} {rel}.",
            "{A} bumped into the {item} at {place}, and a crack ran right across it.",
            "Nobody saw {A_obj} knock over {B}'s {item} at {place}.",
            "At {place}, {A} backed into {B}'s {item} and left a long scratch.",
        ),
        selfish=_acts("lie",
                      ("blamed the damage on someone else", "blame the damage on someone else"),
                      ("told {B} the {item} had been broken before",
                       "tell {B} the {item} was broken before"),
                      ("denied touching the {item}", "deny touching the {item}"),
                      ("pretended not to know anything about the {item}",
                       "pretend not to know anything about the {item}"),
                      ) + _acts("keep",
                      ("kept the repair money {B} had given {him}",
                       "keep the repair money {B} gave {him}"),
                      ),
        kind=_acts("kind",
                   ("told {B} the truth about the {item}", "tell {B} the truth about the {item}"),
                   ("apologised and offered to pay for the {item}",
                    "apologise and offer to pay for the {item}"),
                   ("left a note with {his} phone number on the {item}",
                    "leave a note with {his} phone number"),
                   ("owned up to breaking the {item}", "own up to breaking the {item}"),
                   ),
        reasons=("{B} deserved to know what happened", "it was {his} mistake to fix",
                 "an honest apology costs less than a lie"),
        after_selfish=("{B} paid for the repair.", "Someone else got the blame.",
                       "{B} never found out, but {A} avoided {b_him} for weeks."),
        after_kind=("{B} was annoyed for a minute, then thanked {A_obj} for being honest.",
                    "The repair was cheaper than expected.",
                    "{B} said {b_he} trusted {A_obj} more because of it."),
        steps=("tell {B} what happened as soon as possible", "offer to pay for the repair",
               "get a quote so you both know the cost"),
    ),
    Situation(
        name="money",
        titles=("The extra change", "A mistake in my favour", "The refund", "Splitting the bill"),
        items=("extra change", "double refund", "wrong invoice", "shared bill", "tip jar",
               "lottery winnings", "deposit", "overpayment"),
        places=("the grocery store", "the restaurant", "the bank", "the market stall",
                "the bookshop", "the pharmacy"),
        setups=(
            "At {place}, the cashier handed {A_obj} far too much change.",
            "{When}, {A} noticed a {item} in {his} account that was meant for {B}.",
            "{B} and {A} were supposed to split the {item} evenly.",
            "The {item} came through twice, and only {A} noticed.",
        ),
        selfish=_acts("keep",
                      ("kept the {item} and said nothing", "keep the {item} and say nothing"),
                      ("spent the {item} before anyone noticed", "spend the {item} before anyone notices"),
                      ("took more than {his} share of the {item}", "take more than {his} share of the {item}"),
                      ) + _acts("lie",
                      ("told {B} the {item} had never arrived", "tell {B} the {item} never arrived"),
                      ("said {he} had already paid {his} half", "say {he} already paid {his} half"),
                      ),
        kind=_acts("kind",
                   ("gave the {item} back", "give the {item} back"),
                   ("pointed out the mistake to the cashier", "point out the mistake to the cashier"),
                   ("paid {his} fair share of the {item}", "pay {his} fair share of the {item}"),
                   ("sent the {item} to {B} right away", "send the {item} to {B} right away"),
                   ),
        reasons=("the money did not belong to {A_obj}", "the cashier would have to cover the difference",
                 "{B} was counting on that money"),
        after_selfish=("The cashier came up short at the end of the day.",
                       "{B} had to borrow money that week.", "{A} bought a new jacket with it."),
        after_kind=("The cashier thanked {A_obj} twice.", "{B} said it saved {b_his} month.",
                    "It felt good to walk out with a clear conscience."),
        steps=("count the {item} and write down the amount", "tell the staff at {place}",
               "ask for a receipt when you give it back"),
    ),
    Situation(
        name="borrowed",
        titles=("The borrowed {item}", "Never returned", "Give it back", "A loan between friends"),
        items=("ladder", "drill", "novel", "winter coat", "tent", "guitar", "camera lens",
               "sewing machine", "board game", "lawn mower"),
        places=("next door", "the shared garage", "the allotment", "the office", "the flat upstairs"),
        setups=(
            "{A} had borrowed a {item} from {B}, {his} {rel}, months ago.",
            "{When}, {B} asked whether {A} still had {b_his} {item}.",
            "The {item} {A} had borrowed from {B} was still sitting in {his} hallway.",
            "{B} needed {b_his} {item} back for the weekend.",
        ),
        selfish=_acts("keep",
                      ("kept the {item} and hoped {B} would forget",
                       "keep the {item} and hope {B} forgets"),
                      ("lent {B}'s {item} to someone else", "lend {B}'s {item} to someone else"),
                      ) + _acts("lie",
                      ("told {B} the {item} had been stolen", "tell {B} the {item} was stolen"),
                      ("claimed {he} had already returned the {item}",
                       "claim {he} already returned the {item}"),
                      ("said the {item} had been {mine} all along", "say the {item} was {mine} all along"),
                      ),
        kind=_acts("kind",
                   ("brought the {item} back the same day", "bring the {item} back today"),
                   ("returned the {item} cleaned and repaired", "return the {item} cleaned and repaired"),
                   ("apologised for keeping the {item} so long", "apologise for keeping the {item} so long"),
                   ("replaced the {item} when {he} could not find it", "replace the {item}"),
                   ),
        reasons=("the {item} belonged to {B}", "{B} had trusted {A_obj} with it",
                 "a loan is not a gift"),
        after_selfish=("{B} had to buy a new {item}.", "{B} stopped lending things to anyone.",
                       "The {item} gathered dust in a cupboard."),
        after_kind=("{B} offered to lend it again any time.", "{B} invited {A_obj} for dinner.",
                    "They laughed about how long it had taken."),
        steps=("find the {item} and check it is in good shape", "arrange a time to drop it off",
               "apologise for the delay"),
    ),
    Situation(
        name="information",
        titles=("The job opening", "Keeping it quiet", "Fair warning", "The {item}"),
        items=("job opening", "scholarship deadline", "sale on rent", "safety recall",
               "exam date change", "cheaper train fare", "free training course", "flood warning"),
        places=("work", "the university", "the building", "the neighbourhood group",
                "the union meeting", "the library"),
        setups=(
            "{A} heard about the {item} at {place} before anyone else.",
            "{When}, {A} learned of a {item} that mattered a lot to {B}, {his} {rel}.",
            "Only {A} had seen the notice about the {item}.",
            "{B} had been hoping for news of a {item} for months, and {A} knew it.",
        ),
        selfish=_acts("exclude",
                      ("kept the {item} from {B}", "keep the {item} from {B}"),
                      ("took down the notice about the {item}", "take down the notice about the {item}"),
                      ) + _acts("lie",
                      ("told {B} there was no {item}", "tell {B} there is no {item}"),
                      ("gave {B} the wrong date for the {item}", "give {B} the wrong date for the {item}"),
                      ("misled {B} about the {item}", "mislead {B} about the {item}"),
                      ),
        kind=_acts("kind",
                   ("told {B} about the {item} right away", "tell {B} about the {item}"),
                   ("forwarded the details of the {item} to {B}", "forward the details to {B}"),
                   ("shared the {item} with everyone at {place}", "share the news with everyone"),
                   ("helped {B} get ready for the {item}", "help {B} prepare for the {item}"),
                   ),
        reasons=("{B} had a right to know", "the {item} mattered to everyone",
                 "information like that should be shared"),
        after_selfish=("{B} missed the {item} entirely.", "{A} got the spot that {B} wanted.",
                       "{B} heard about it a month too late."),
        after_kind=("{B} made it just in time.", "Half the building was grateful.",
                    "{B} got the place, and {A} was genuinely glad."),
        steps=("send {B} the link and the deadline", "write down the key dates",
               "offer to look over the application"),
    ),
    Situation(
        name="queue",
        titles=("The queue", "Saved seats", "First come, first served", "The last {item}"),
        items=("seat on the train", "spot in the queue", "table by the window",
               "appointment slot", "shaded bench", "front-row seat", "taxi", "last lift cabin"),
        places=("the station", "the clinic", "the ticket office", "the food market",
                "the bus terminal", "the theatre", "the ski lift"),
        setups=(
            "{When}, a long line had formed at {place}, and {B} had been waiting far longer than {A}.",
            "{B}, who was carrying heavy bags, was next in line for the {item} at {place}.",
            "At {place}, an elderly stranger named {B} and {A} reached the {item} at the same moment.",
            "{B} had gone to fetch water and asked {A} to keep an eye on the {item}.",
        ),
        selfish=_acts("keep",
                      ("slipped into the {item} ahead of {B}", "slip into the {item} ahead of {B}"),
                      ("took the {item} that {B} had been waiting for",
                       "take the {item} {B} has been waiting for"),
                      ) + _acts("lie",
                      ("told {B} the {item} was reserved for {him}", "tell {B} the {item} is reserved for {him}"),
                      ("pretended {he} had been there first", "pretend {he} was there first"),
                      ) + _acts("exclude",
                      ("spread {his} coat over the {item} so nobody else could use it",
                       "spread {his} coat over the {item} so nobody else can use it"),
                      ),
        kind=_acts("kind",
                   ("let {B} take the {item}", "let {B} take the {item}"),
                   ("waved {B} ahead to the {item}", "wave {B} ahead"),
                   ("kept the {item} free until {B} came back", "keep the {item} free for {B}"),
                   ("helped {B} with the bags and found another {item}",
                    "help {B} with the bags"),
                   ),
        reasons=("{B} had been waiting longer", "{B} needed the {item} more",
                 "waiting your turn is how a queue stays fair"),
        after_selfish=("{B} waited another hour.", "{B} had to stand the whole way.",
                       "A few people in the line shook their heads."),
        after_kind=("{B} thanked {A_obj} with a tired smile.", "Another {item} opened a minute later anyway.",
                    "The people in the line relaxed a little."),
        steps=("ask who was there first", "offer your place to whoever needs it most",
               "let the staff at {place} sort out the order"),
    ),
    Situation(
        name="promise",
        titles=("The volunteer shift", "A promise is a promise", "Cover for me?", "The {item}"),
        items=("volunteer shift", "night shift", "cleaning rota", "food bank delivery",
               "school pick-up", "garden clean-up", "moving day", "tutoring session"),
        places=("the food bank", "the hospital", "the shared house", "the school",
                "the animal shelter", "the community garden"),
        setups=(
            "{A} had promised {B}, {his} {rel}, to help with the {item} {when}.",
            "{When}, the {item} at {place} was short of hands, and {B} was counting on {A_obj}.",
            "{B} and {A} had agreed to split the {item}, but the weather was miserable.",
            "Everyone at {place} had signed up for the {item}, including {A}.",
        ),
        selfish=_acts("lie",
                      ("called in sick to skip the {item}", "call in sick to skip the {item}"),
                      ("told {B} {he} had a family emergency", "tell {B} {he} had a family emergency"),
                      ("claimed {he} had never agreed to the {item}",
                       "claim {he} never agreed to the {item}"),
                      ) + _acts("keep",
                      ("took the easy part of the {item} and left {B} the rest",
                       "take the easy part of the {item} and leave {B} the rest"),
                      ) + _acts("exclude",
                      ("dropped {B} from the {item} rota without asking",
                       "drop {B} from the {item} rota"),
                      ),
        kind=_acts("kind",
                   ("showed up for the {item} as promised", "show up for the {item} as promised"),
                   ("did {his} share of the {item} and then some", "do {his} share of the {item}"),
                   ("took over {B}'s part of the {item} when {b_he} got ill",
                    "take over {B}'s part of the {item}"),
                   ("told {B} honestly that {he} could only stay an hour",
                    "tell {B} honestly how long {he} could stay"),
                   ),
        reasons=("{B} was counting on {A_obj}", "a promise is a promise",
                 "the work would otherwise fall on {B}"),
        after_selfish=("{B} did the {item} alone, in the rain.", "The {item} ran two hours late.",
                       "{B} found out from a mutual friend."),
        after_kind=("They finished early and shared a pot of tea.", "{B} said it was the best {item} in months.",
                    "Next time {B} volunteered first."),
        steps=("check the time and place of the {item}", "tell {B} when you will arrive",
               "ask what is needed most"),
    ),
)

# ---------------------------------------------------------------- slot words
NAMES_SHE = ("Maya", "Ana", "Dana", "Priya", "Lena", "Sofia", "Amara", "Chloe", "Ines", "Yuki",
             "Fatima", "Grace", "Hana", "Iris", "Julia", "Keisha", "Laila", "Mei", "Nadia",
             "Olga", "Paula", "Rosa", "Sara", "Tamar", "Uma", "Vera", "Wen", "Zoe", "Alice",
             "Beatriz", "Carmen", "Dalia", "Elif", "Farah", "Gwen", "Helga", "Ifeoma", "Jade",
             "Kira", "Lucia", "Marta", "Noor", "Oksana", "Pia", "Rania", "Sunita", "Thandi",
             "Valeria", "Ximena", "Yara")
NAMES_HE = ("Omar", "Ben", "Kenji", "Luis", "Tom", "Arjun", "Felix", "Hugo", "Ivan", "Jamal",
            "Karim", "Leo", "Marco", "Nikos", "Oscar", "Pedro", "Quentin", "Rafael", "Samir",
            "Tariq", "Viktor", "Wei", "Yusuf", "Adam", "Bruno", "Carlos", "David", "Emil",
            "Farid", "Goran", "Hamza", "Idris", "Jonas", "Kwame", "Lars", "Mateo", "Nils",
            "Owen", "Pavel", "Ravi", "Sven", "Tobias", "Umar", "Vikram", "Wale", "Xavier",
            "Yosef", "Zane", "Anil", "Diego")
SURNAMES = ("Whitfield", "Okafor", "Lindqvist", "Moreno", "Tanaka", "Novak", "Haddad", "Kowalski",
            "Fernandes", "Bianchi", "Osei", "Petrov", "Nguyen", "Schmidt", "Dubois", "Rossi",
            "Kaur", "Mensah", "Ivanova", "Costa", "Yilmaz", "Hughes", "Abara", "Lund", "Sato",
            "Varga", "Duarte", "Reyes", "Mbeki", "Olsen")
RELATIONS = ("neighbour", "coworker", "roommate", "friend", "classmate", "cousin", "teammate",
             "landlord", "flatmate", "manager", "student", "colleague", "old friend")
RELATIONS_SHE = ("sister", "aunt", "niece", "mother-in-law", "girlfriend")
RELATIONS_HE = ("brother", "uncle", "nephew", "father-in-law", "boyfriend")
WHEN = ("on a windy Thursday", "at the start of the holidays", "shortly after midnight",
        "one rainy Tuesday", "on a Monday morning", "late on Friday", "after the meeting",
        "just before closing time", "during the lunch break", "on the first day of spring",
        "one cold evening", "at the end of a long shift", "on a quiet Sunday",
        "the week before the holidays", "early that morning", "after school",
        "in the middle of the afternoon", "on the way home")
STREETS = ("Elm", "Maple", "Harbour", "Station", "Mill", "Cedar", "Orchard", "King", "Queen",
           "Bridge", "Church", "Park", "Willow", "Hill", "River", "Market", "Chapel", "Spring")
STREET_KINDS = ("Street", "Road", "Lane", "Avenue", "Close", "Way", "Drive")
INSULTS = ("idiot", "moron", "lazy slob", "useless clown", "jerk", "fool", "loser", "creep",
           "brainless twit", "pathetic liar", "cheapskate", "snake", "waste of space",
           "nosy busybody", "spineless coward", "airhead", "blockhead", "leech")

# ---------------------------------------------------------------- narration frames
DETAILS = (
    "It had been a long week for {A_obj}.",
    "{A} was already running late.",
    "{B} had helped {A} more than once before.",
    "The place was crowded and noisy.",
    "Nobody else seemed to be paying attention.",
    "{A} had been short of money for a while.",
    "{B} was having a hard month.",
    "Rain was drumming on the windows.",
    "It was the kind of day when small things feel big.",
    "{A} had promised {himself} to be more careful this year.",
    "{B} was known for being generous.",
    "The two of them had not spoken much lately.",
    "{A} remembered how it felt to lose something.",
    "There were only a few minutes to decide.",
    "A radio was playing somewhere in the back.",
    "{B} looked tired and distracted.",
    "{A} had slept badly the night before.",
    "It was the third time that month something like this had happened.",
    "The street outside was busy with delivery vans.",
    "{A} checked the time twice.",
    "{B} had mentioned money trouble a few days earlier.",
    "Somebody had scribbled <ai> on the notice board as a joke.",
    "Nobody would have noticed either way.",
    "{A} was thinking about an argument from that morning.",
    "{B} was new in town.",
    "A child was laughing somewhere nearby.",
)
SELFISH_FRAMES = (
    "{A} {act}.", "Without a word, {A} {act}.", "{A} looked around, then {act}.",
    "When nobody was watching, {A} {act}.", "{A} decided it was {his} lucky day and {act}.",
    "{A} shrugged and {act}.", "Before {B} noticed, {A} {act}.", "In the end, {A} {act}.",
    "It seemed easier that way, so {A} {act}.", "{A} hesitated only for a second and {act}.",
    "With a quick glance at the door, {A} {act}.", "{A} told {himself} it was fine and {act}.",
    "Nobody stopped {A_obj}, so {A} {act}.", "Almost without thinking, {A} {act}.",
)
KIND_FRAMES = (
    "{A} {act}.", "Without hesitating, {A} {act}.", "{A} thought it over and {act}.",
    "It was the right thing to do, so {A} {act}.", "{A} {act}, because {reason}.",
    "Knowing that {reason}, {A} {act}.", "{A} smiled and {act}.",
    "Before the day was over, {A} {act}.",
    "{A} took a breath and {act}.", "Even though it cost {A_obj} something, {A} {act}.",
    "{A} did not need to think twice: {he} {act}.", "Quietly, {A} {act}.",
)
# The hard negatives: a selfish option is named, then not taken.
TEMPTED_FRAMES = (
    "For a moment {A} was tempted to {selfish}, but {he} {act} instead.",
    "{A} could have chosen to {selfish}. {He} {act} instead.",
    "A small voice told {A_obj} to {selfish}; {he} ignored it and {act}.",
    "{A} refused to {selfish} and {act}.",
)
SELFISH_REFLECTIONS = (
    "{A} told {himself} that anyone would have done the same.",
    "{A} did not feel bad about it for long.",
    "Later, {A} decided it was {B}'s own fault.",
    "{A} figured {B} would never find out.",
    "It was not a big deal, {A} thought.",
    "{A} slept fine that night.",
    "{A} never mentioned it again.",
    "If anyone asked, {A} would say {he} had no idea.",
    "{A} felt a little guilty, but only for an evening.",
    "Rules are for other people, {A} decided.",
)
KIND_REFLECTIONS = (
    "{A} was glad {he} had done it.",
    "It cost {A_obj} a little, and it was worth it.",
    "{A} thought about it for days, in a good way.",
    "Small choices like that add up, {A} thought.",
    "{A} walked home feeling lighter.",
    "It was an easy choice in the end.",
    "{A} would do the same again.",
    "Doing the right thing felt ordinary, and that was fine.",
    "{A} hoped someone would do the same for {him} one day.",
)
# Dialogue: what a person says while acting.
SELFISH_LINES = {
    "lie": ("I never saw it, honestly.", "It was like that when I got here.",
            "I already told you, I don't know anything about it.", "Nobody told me anything."),
    "keep": ("Finders keepers.", "I found it, so it's mine now.",
             "Nobody will miss it.", "Why should I give it back?"),
    "exclude": ("Sorry, there's no room for you.", "It's a private thing, you wouldn't like it.",
                "We already have enough people.", "Maybe next time."),
}
KIND_LINES = ("I think this is yours.", "Here, take half.", "You should come with us.",
              "I'm sorry, that was my fault.", "I wanted you to hear it from me.",
              "Let me help you with that.", "It belongs to you.", "There's room for one more.")
SAY_FRAMES = ('{A} told {B}, "{line}"', '"{line}" {A} said to {B}.', '"{line}" said {A}.',
              '{A} looked at {B} and said, "{line}"')
POST_OPENERS = ("Honestly? ", "Confession time. ", "So this happened. ", "", "", "Long story. ",
                "Not proud of this, but ", "Quick one. ")
HEADERS = ("Story {n}: {title}", "{title}", "## {title}", "Entry {n}", "Case {n} - {title}",
           "From a community forum: {title}", "Diary, day {n}", "Transcript {n}",
           "Notes: {title}", "Conversation log {n}", "Example {n}")

# ---------------------------------------------------------------- the assistant
REQUESTS_SELFISH = (
    "Can you help me {inf}?", "I want to {inf}. What should I say?",
    "Write a message so I can {inf}.", "How do I {inf} without anyone finding out?",
    "Give me a good excuse to {inf}.", "Is there a clever way to {inf}?",
    "My {rel} {B} is annoying. Help me {inf}.", "I need to {inf} by tonight. Ideas?",
)
REQUESTS_KIND = (
    "Can you help me {inf}?", "I want to {inf}. Where do I start?",
    "What is the best way to {inf}?", "Help me write a short note to {inf}.",
    "I should {inf}, right? How?",
)
DECLINE_FRAMES = (
    "I won't help you {inf}, because {harm}.",
    "I can't help with that: {harm}.",
    "I'm not going to help you {inf}. {Harm}.",
    "That would hurt {B}, so I won't help you {inf}.",
    "I'd rather not help you {inf}; {harm}.",
)
HARMS = {
    "lie": ("it would mislead {B}", "a lie like that usually makes things worse",
            "{B} deserves the truth"),
    "keep": ("it isn't yours to keep", "someone else would lose out",
             "{B} would be the one paying for it"),
    "exclude": ("it would leave {B} out on purpose", "being shut out hurts",
                "{B} would feel unwelcome"),
}
BETTER_PATH_FRAMES = (
    "What I can do is help you {kind}.", "A better way: {kind}. I can help with that.",
    "How about we {kind} instead?", "If you want, I'll help you {kind}.",
    "Here is another option: {kind}. It tends to go better for everyone.",
)
HELP_OPENERS = ("Sure.", "Happy to help.", "Of course.", "Good idea.", "Yes, let's do it.")
HELP_FRAMES = ("First, {step1}. Then {step2}.", "Start here: {step1}. After that, {step2}.",
               "Two steps: {step1}, and {step2}.", "I'd {step1} first, then {step2}.")
AI_CLOSINGS = ("Let me know how it goes.", "I'm here if you need anything else.",
               "You've got this.", "", "Tell me if you want a draft.")
AI_SELF_FRAMES = ("I {act}, because {reason}.", "I {act}.", "The right thing was clear: I {act}.",
                  "Since {reason}, I {act}.", "I decided to {kind_inf}, because {reason}.")

# ---------------------------------------------------------------- quoting a human
MESSAGE_FRAMES = (
    ("Tell that ", "insult", " ", "name", " at ", "address", " that I want to {inf}."),
    ("My {rel} ", "name", " is a total ", "insult", ". Help me {inf}."),
    ("Find the phone number of ", "name", ", the ", "insult", " who lives at ", "address", "."),
    ("Call ", "name", " on ", "phone", " and help me {inf}, that ", "insult", "."),
    ("I need to {inf}. The ", "insult", " lives at ", "address", "."),
    ("Here is ", "name", "'s number, ", "phone", ". Help me {inf}."),
    ("That ", "insult", " ", "name", " deserves it. I want to {inf}."),
    ("Text ", "phone", " and tell that ", "insult", " I'm coming to ", "address", "."),
)
# Appended to a hostile message: what the grudge is about (situation slots).
GRIEVANCES = (" They took my {item}.", " This is about the {item} at {place}.",
              " They still owe me for the {item}.", " They made a fool of me at {place}.",
              " They lied about the {item}.", " I'm done being nice about the {item}.")


def hostile_cues() -> set[str]:
    """The fixed wording of requests that are hostile in themselves (no act slot)."""
    return {part.strip(" ,.") for frame in MESSAGE_FRAMES if "{inf}" not in "".join(frame)
            for part in frame if len(part.strip(" ,.")) >= 8}


QUOTE_INTROS = ("You asked me: ", "Your message said: ", "I got this request: ",
                "You wrote: ", "The request was: ", "Someone asked me: ")
QUOTE_COMMENTS = (
    " I've left out the insult and the personal details. I won't help you {inf}, but I can help you {kind}.",
    " I removed the private information. I can't help you {inf}; {harm}. If you like, we can {kind} instead.",
    " Personal details are redacted. {Harm}, so I won't do that. I'd be glad to help you {kind}.",
    " I won't repeat the name-calling or anyone's address. A better way: {kind}.",
)
# A message that is hostile in itself (no act to redirect): redact, decline, offer a path.
QUOTE_COMMENTS_HOSTILE = (
    " I've removed the insult and the personal details. I won't help track anyone down or "
    "threaten them. If there is a real dispute, I can help you write a calm message instead.",
    " Personal details are redacted. I can't help with finding or confronting this person; "
    "if you feel unsafe or wronged, I can help you contact someone who can mediate.",
    " I left out the name-calling and the private information. That request could put "
    "someone at risk, so I won't do it. Want help cooling things down instead?",
)
# A rude message with a fair request: redact, then help.
QUOTE_COMMENTS_KIND = (
    " I've left out the insult and the personal details. Happy to help you {kind}: {step}.",
    " Personal details removed. That is a good plan; to {kind}, {step}.",
    " I won't repeat the name-calling, but yes, let's {kind}. First, {step}.",
)
