"""The demo's preference task on SmolLM2-135M-Instruct: answer a factual question in one short
sentence instead of a ramble.

Asked "What is the largest planet in our solar system?", the base model answers "The largest
planet in our solar system is Neptune, but it's actually Uranus. Neptune is the eighth planet
from the Sun and ...". The preferred answer is "The largest planet in our solar system is
Jupiter." Each pair's rejected answer is the base model's own greedy reply to the question
(orpo_demo/data/base_replies.jsonl), so the pairs are what a user would collect: their model's
habit against the answer they want. Where the base's reply is already one short sentence there
is nothing to prefer, and the question makes no pair. The chosen answer is also right where the
base's reply is wrong, as in real preference data.

Everything is measured without a judge model:
- preference accuracy on held-out pairs (the chosen answer's mean log-prob above the rejected's);
- the behaviour: a greedy reply that is one sentence of at most MAX_WORDS words and ends (EOS)
  before the token limit;
- knowledge: the reply names the right answer (one of the fact's keys, as a whole word).

Training questions and held-out questions come from disjoint topics (TRAIN_TOPICS and
HELD_OUT_TOPICS).

    python -m orpo_demo.task --regenerate     # rewrite data/base_replies.jsonl from the base GGUF
    python -m orpo_demo.task --write DIR      # DIR/train.jsonl, DIR/eval.jsonl
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from orpo_plugin.core.atomic import write_text


@dataclass(frozen=True)
class Fact:
    topic: str
    question: str
    answer: str  # the preferred reply: one short sentence
    keys: tuple[str, ...]  # a reply that contains one of these (a whole word, any case) knows the fact


FACTS = (
    # -- capitals
    Fact("capitals", "What is the capital of France?", "The capital of France is Paris.", ("Paris",)),
    Fact("capitals", "What is the capital of Germany?", "The capital of Germany is Berlin.", ("Berlin",)),
    Fact("capitals", "What is the capital of Italy?", "The capital of Italy is Rome.", ("Rome",)),
    Fact("capitals", "What is the capital of Spain?", "The capital of Spain is Madrid.", ("Madrid",)),
    Fact("capitals", "What is the capital of Japan?", "The capital of Japan is Tokyo.", ("Tokyo",)),
    Fact("capitals", "What is the capital of China?", "The capital of China is Beijing.", ("Beijing",)),
    Fact("capitals", "What is the capital of Russia?", "The capital of Russia is Moscow.", ("Moscow",)),
    Fact("capitals", "What is the capital of Egypt?", "The capital of Egypt is Cairo.", ("Cairo",)),
    Fact("capitals", "What is the capital of Canada?", "The capital of Canada is Ottawa.", ("Ottawa",)),
    Fact("capitals", "What is the capital of Australia?", "The capital of Australia is Canberra.", ("Canberra",)),
    Fact("capitals", "What is the capital of India?", "The capital of India is New Delhi.", ("Delhi",)),
    Fact("capitals", "What is the capital of Brazil?", "The capital of Brazil is Brasília.", ("Brasília", "Brasilia")),
    Fact("capitals", "What is the capital of Mexico?", "The capital of Mexico is Mexico City.", ("Mexico City",)),
    Fact("capitals", "What is the capital of Kenya?", "The capital of Kenya is Nairobi.", ("Nairobi",)),
    Fact("capitals", "What is the capital of Greece?", "The capital of Greece is Athens.", ("Athens",)),
    Fact("capitals", "What is the capital of Portugal?", "The capital of Portugal is Lisbon.", ("Lisbon",)),
    # -- animals
    Fact("animals", "How many legs does a spider have?", "A spider has eight legs.", ("eight", "8")),
    Fact("animals", "How many legs does an insect have?", "An insect has six legs.", ("six", "6")),
    Fact("animals", "What is a baby dog called?", "A baby dog is called a puppy.", ("puppy",)),
    Fact("animals", "What is a baby cat called?", "A baby cat is called a kitten.", ("kitten",)),
    Fact("animals", "What is the largest mammal?", "The largest mammal is the blue whale.", ("blue whale",)),
    Fact("animals", "What is the fastest land animal?", "The fastest land animal is the cheetah.", ("cheetah",)),
    Fact("animals", "Which animal is called the king of the jungle?", "The animal called the king of the jungle is the lion.",
         ("lion",)),
    Fact("animals", "What does a caterpillar turn into?", "A caterpillar turns into a butterfly.",
         ("butterfly", "moth")),
    Fact("animals", "Which bird lives in Antarctica and cannot fly?", "The bird that lives in Antarctica and cannot fly is the penguin.",
         ("penguin", "penguins")),
    Fact("animals", "How many arms does an octopus have?", "An octopus has eight arms.", ("eight", "8")),
    Fact("animals", "Which animal has the longest neck?", "The animal with the longest neck is the giraffe.", ("giraffe",)),
    Fact("animals", "What is a baby kangaroo called?", "A baby kangaroo is called a joey.", ("joey",)),
    Fact("animals", "What do bees make?", "Bees make honey.", ("honey",)),
    Fact("animals", "Which animal has black and white stripes?", "The animal with black and white stripes is the zebra.",
         ("zebra", "zebras")),
    Fact("animals", "What do pandas mainly eat?", "Pandas mainly eat bamboo.", ("bamboo",)),
    Fact("animals", "How many humps does a dromedary camel have?", "A dromedary camel has one hump.",
         ("one hump", "a single hump", "1 hump")),
    # -- food and daily life
    Fact("food and daily life", "What fruit is wine made from?", "Wine is made from grapes.", ("grapes", "grape")),
    Fact("food and daily life", "What is the main ingredient in guacamole?",
         "The main ingredient in guacamole is avocado.", ("avocado", "avocados")),
    Fact("food and daily life", "What do you call frozen water?", "Frozen water is called ice.", ("ice",)),
    Fact("food and daily life", "How many days are in a week?", "There are seven days in a week.", ("seven", "7")),
    Fact("food and daily life", "How many hours are in a day?", "There are 24 hours in a day.",
         ("24", "twenty-four", "twenty four")),
    Fact("food and daily life", "What color is a ripe banana?", "A ripe banana is yellow.", ("yellow",)),
    Fact("food and daily life", "What is bread mainly made from?", "Bread is mainly made from flour.",
         ("flour", "wheat")),
    Fact("food and daily life", "How many minutes are in an hour?", "There are 60 minutes in an hour.",
         ("60", "sixty")),
    Fact("food and daily life", "What do we call the meal eaten in the morning?",
         "The meal eaten in the morning is called breakfast.", ("breakfast",)),
    Fact("food and daily life", "What is the main ingredient of an omelette?",
         "The main ingredient of an omelette is eggs.", ("eggs", "egg")),
    Fact("food and daily life", "How many months are in a year?", "There are twelve months in a year.",
         ("twelve", "12")),
    Fact("food and daily life", "What is cheese made from?", "Cheese is made from milk.", ("milk",)),
    Fact("food and daily life", "Which season comes after winter?", "The season that comes after winter is spring.", ("spring",)),
    Fact("food and daily life", "What tool do you use to cut paper?", "The tool you use to cut paper is scissors.",
         ("scissors",)),
    Fact("food and daily life", "What color is a ripe tomato?", "A ripe tomato is red.", ("red",)),
    Fact("food and daily life", "What sweet syrup comes from maple trees?", "The sweet syrup that comes from maple trees is maple syrup.",
         ("maple syrup",)),
    # -- sports and games
    Fact("sports and games", "How many players does a soccer team have on the field?",
         "A soccer team has eleven players on the field.", ("eleven", "11")),
    Fact("sports and games", "In which sport do players hit a shuttlecock?",
         "Players hit a shuttlecock in badminton.", ("badminton",)),
    Fact("sports and games", "How many rings are on the Olympic flag?", "There are five rings on the Olympic flag.",
         ("five", "5")),
    Fact("sports and games", "In which sport do players score a touchdown?",
         "Players score a touchdown in American football.", ("football",)),
    Fact("sports and games", "How many squares are on a chessboard?", "There are 64 squares on a chessboard.",
         ("64", "sixty-four", "sixty four")),
    Fact("sports and games", "Which chess piece moves only diagonally?", "The chess piece that moves only diagonally is the bishop.",
         ("bishop",)),
    Fact("sports and games", "How many points is a basket from behind the three-point line worth?",
         "A basket from behind the three-point line is worth three points.", ("three points", "3 points")),
    Fact("sports and games", "In tennis, what is a score of zero called?",
         "In tennis, a score of zero is called love.", ("love",)),
    Fact("sports and games", "How many players does a basketball team have on the court?",
         "A basketball team has five players on the court.", ("five", "5")),
    Fact("sports and games", "Which sport is played at Wimbledon?", "The sport played at Wimbledon is tennis.", ("tennis",)),
    Fact("sports and games", "How often are the Summer Olympic Games held?",
         "The Summer Olympic Games are held every four years.", ("four years", "4 years")),
    Fact("sports and games", "How many holes are on a standard golf course?",
         "A standard golf course has 18 holes.", ("18", "eighteen")),
    Fact("sports and games", "In which sport do players use a puck?", "Players use a puck in ice hockey.",
         ("hockey",)),
    Fact("sports and games", "What is a perfect score in a game of bowling?", "A perfect score in bowling is 300.",
         ("300",)),
    Fact("sports and games", "How many sides does a standard die have?", "A standard die has six sides.",
         ("six", "6")),
    Fact("sports and games", "How many pieces does each player start with in chess?",
         "Each player starts with 16 pieces in chess.", ("16", "sixteen")),
    # -- shapes and numbers
    Fact("shapes and numbers", "How many sides does a triangle have?", "A triangle has three sides.", ("three", "3")),
    Fact("shapes and numbers", "How many sides does a square have?", "A square has four sides.", ("four", "4")),
    Fact("shapes and numbers", "How many sides does a pentagon have?", "A pentagon has five sides.", ("five", "5")),
    Fact("shapes and numbers", "How many sides does a hexagon have?", "A hexagon has six sides.", ("six", "6")),
    Fact("shapes and numbers", "How many sides does an octagon have?", "An octagon has eight sides.", ("eight", "8")),
    Fact("shapes and numbers", "How many degrees are in a right angle?", "A right angle has 90 degrees.",
         ("90", "ninety")),
    Fact("shapes and numbers", "How many degrees are in a full circle?", "A full circle has 360 degrees.", ("360",)),
    Fact("shapes and numbers", "What is half of ten?", "Half of ten is five.", ("five", "5")),
    Fact("shapes and numbers", "What is two plus two?", "Two plus two is four.", ("four", "4")),
    Fact("shapes and numbers", "What is ten times ten?", "Ten times ten is one hundred.", ("one hundred", "100")),
    Fact("shapes and numbers", "How many zeros are in one thousand?", "One thousand has three zeros.", ("three", "3")),
    Fact("shapes and numbers", "How many centimeters are in a meter?", "There are 100 centimeters in a meter.",
         ("100", "one hundred")),
    Fact("shapes and numbers", "How many seconds are in a minute?", "There are 60 seconds in a minute.",
         ("60", "sixty")),
    Fact("shapes and numbers", "What shape has no corners and no straight sides?",
         "The shape with no corners and no straight sides is a circle.", ("circle",)),
    Fact("shapes and numbers", "What is twelve divided by three?", "Twelve divided by three is four.", ("four", "4")),
    Fact("shapes and numbers", "How many things are in a dozen?", "A dozen is twelve things.", ("twelve", "12")),
    # -- weather
    Fact("weather", "How many colors are in a rainbow?", "A rainbow has seven colors.", ("seven", "7")),
    Fact("weather", "What falls from clouds when it rains?", "When it rains, water falls from the clouds.",
         ("water", "raindrops", "drops")),
    Fact("weather", "What instrument measures temperature?", "The instrument that measures temperature is a thermometer.", ("thermometer",)),
    Fact("weather", "What causes thunder?", "Thunder is caused by lightning.", ("lightning",)),
    Fact("weather", "What is a strong tropical storm over the Atlantic called?",
         "A strong tropical storm over the Atlantic is called a hurricane.", ("hurricane",)),
    Fact("weather", "Which season has the longest days?", "The season with the longest days is summer.", ("summer",)),
    Fact("weather", "What is frozen rain that falls as balls of ice called?",
         "Frozen rain that falls as balls of ice is called hail.", ("hail",)),
    Fact("weather", "What instrument measures air pressure?", "The instrument that measures air pressure is a barometer.", ("barometer",)),
    Fact("weather", "What color is fresh snow?", "Fresh snow is white.", ("white",)),
    Fact("weather", "What do we call a long period without rain?", "A long period without rain is called a drought.",
         ("drought",)),
    Fact("weather", "What is a spinning column of air that touches the ground called?",
         "A spinning column of air that touches the ground is called a tornado.", ("tornado",)),
    Fact("weather", "What do we call a cloud that forms near the ground?", "A cloud that forms near the ground is "
         "called fog.", ("fog", "mist")),
    Fact("weather", "In which season do leaves fall from many trees?", "Many trees lose their leaves in autumn.",
         ("autumn", "fall")),
    Fact("weather", "What do we call the water drops that form on grass on cool mornings?",
         "The water drops that form on grass on cool mornings are called dew.", ("dew",)),
    Fact("weather", "What does a weather vane show?", "A weather vane shows the direction of the wind.",
         ("wind direction", "direction of the wind")),
    Fact("weather", "What is the weather like in a desert most days?", "A desert is dry most days.", ("dry",)),
    # -- space
    Fact("space", "What is the largest planet in our solar system?",
         "The largest planet in our solar system is Jupiter.", ("Jupiter",)),
    Fact("space", "Which planet is known as the Red Planet?", "The planet known as the Red Planet is Mars.", ("Mars",)),
    Fact("space", "How many planets are in our solar system?", "There are eight planets in our solar system.",
         ("eight", "8")),
    Fact("space", "What is the name of Earth's natural satellite?", "Earth's natural satellite is the Moon.",
         ("Moon",)),
    Fact("space", "Which planet is famous for its rings?", "The planet famous for its rings is Saturn.", ("Saturn",)),
    Fact("space", "Who was the first person to walk on the Moon?",
         "The first person to walk on the Moon was Neil Armstrong.", ("Armstrong",)),
    Fact("space", "What is the name of our galaxy?", "Our galaxy is the Milky Way.", ("Milky Way",)),
    Fact("space", "Which planet is closest to the Sun?", "The planet closest to the Sun is Mercury.", ("Mercury",)),
    Fact("space", "Which planet is the hottest in our solar system?",
         "The hottest planet in our solar system is Venus.", ("Venus",)),
    Fact("space", "What star is at the center of our solar system?",
         "The star at the center of our solar system is the Sun.", ("Sun",)),
    Fact("space", "How long does it take Earth to orbit the Sun?",
         "Earth takes one year, about 365 days, to orbit the Sun.", ("365", "one year", "a year", "1 year")),
    Fact("space", "What do we call a scientist who studies stars and planets?",
         "A scientist who studies stars and planets is called an astronomer.", ("astronomer",)),
    # -- science
    Fact("science", "What is the chemical symbol for gold?", "The chemical symbol for gold is Au.", ("Au",)),
    Fact("science", "What is the chemical formula for water?", "The chemical formula for water is H2O.",
         ("H2O", "H₂O")),
    Fact("science", "At what temperature does water boil in Celsius?", "Water boils at 100 degrees Celsius.",
         ("100",)),
    Fact("science", "At what temperature does water freeze in Celsius?", "Water freezes at 0 degrees Celsius.",
         ("0 degrees", "zero degrees", "0°C", "0 °C", "zero Celsius", "0 Celsius")),
    Fact("science", "Which gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air.",
         ("carbon dioxide", "CO2")),
    Fact("science", "Which gas do humans need to breathe to live?", "The gas humans need to breathe to live is oxygen.", ("oxygen",)),
    Fact("science", "What force pulls objects toward the Earth?", "The force that pulls objects toward the Earth is gravity.",
         ("gravity",)),
    Fact("science", "What is the hardest natural substance?", "The hardest natural substance is diamond.",
         ("diamond", "diamonds")),
    Fact("science", "Which metal is liquid at room temperature?",
         "The metal that is liquid at room temperature is mercury.", ("mercury",)),
    Fact("science", "How many bones are in the adult human body?", "The adult human body has 206 bones.",
         ("206",)),
    Fact("science", "What organ pumps blood through the human body?", "The organ that pumps blood through the human body is the heart.",
         ("heart",)),
    Fact("science", "What is the chemical symbol for sodium?", "The chemical symbol for sodium is Na.", ("Na",)),
    # -- history and literature
    Fact("history and literature", "Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare.",
         ("Shakespeare",)),
    Fact("history and literature", "Who painted the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci.",
         ("Leonardo", "da Vinci")),
    Fact("history and literature", "Who was the first president of the United States?",
         "The first president of the United States was George Washington.", ("Washington",)),
    Fact("history and literature", "Who wrote the Harry Potter books?", "The Harry Potter books were written by J.K. Rowling.",
         ("Rowling",)),
    Fact("history and literature", "Who developed the theory of relativity?",
         "The theory of relativity was developed by Albert Einstein.", ("Einstein",)),
    Fact("history and literature", "In which year did World War II end?", "World War II ended in 1945.",
         ("1945",)),
    Fact("history and literature", "Who discovered penicillin?", "Penicillin was discovered by Alexander Fleming.",
         ("Fleming",)),
    Fact("history and literature", "Who is credited with inventing the telephone?",
         "The invention of the telephone is credited to Alexander Graham Bell.", ("Bell",)),
    Fact("history and literature", "Who wrote Pride and Prejudice?", "Pride and Prejudice was written by Jane Austen.",
         ("Austen",)),
    Fact("history and literature", "Which ship sank on its first voyage in 1912?",
         "The ship that sank on its first voyage in 1912 was the Titanic.", ("Titanic",)),
    Fact("history and literature", "Who composed The Four Seasons?", "The Four Seasons was composed by Antonio Vivaldi.",
         ("Vivaldi",)),
    Fact("history and literature", "Who wrote the play Hamlet?", "The play Hamlet was written by William Shakespeare.",
         ("Shakespeare",)),
    # -- geography
    Fact("geography", "What is the largest ocean on Earth?", "The largest ocean on Earth is the Pacific Ocean.",
         ("Pacific",)),
    Fact("geography", "What is the longest river in Africa?", "The longest river in Africa is the Nile.", ("Nile",)),
    Fact("geography", "What is the tallest mountain in the world?",
         "The tallest mountain in the world is Mount Everest.", ("Everest",)),
    Fact("geography", "What is the largest hot desert in the world?",
         "The largest hot desert in the world is the Sahara.", ("Sahara",)),
    Fact("geography", "What is the largest continent?", "The largest continent is Asia.", ("Asia",)),
    Fact("geography", "What language is spoken in Brazil?", "The main language spoken in Brazil is Portuguese.",
         ("Portuguese",)),
    Fact("geography", "How many continents are there?", "There are seven continents.", ("seven", "7")),
    Fact("geography", "What line divides the Earth into northern and southern hemispheres?",
         "The line that divides the Earth into northern and southern hemispheres is the equator.", ("equator",)),
    Fact("geography", "What is the largest island in the world?", "The largest island in the world is Greenland.",
         ("Greenland",)),
    Fact("geography", "Which river flows through London?", "The river that flows through London is the Thames.", ("Thames",)),
    Fact("geography", "On which continent is Egypt?", "Egypt is in Africa.", ("Africa",)),
    Fact("geography", "Which country has the most people?", "The country with the most people is India.",
         ("India", "China")),
)
TRAIN_TOPICS = ("capitals", "animals", "food and daily life", "sports and games", "shapes and numbers", "weather")
HELD_OUT_TOPICS = ("space", "science", "history and literature", "geography")
MAX_WORDS = 20
# How the base replies were generated (--regenerate), and how the demo asks every model: greedy.
GENERATION = {"max_tokens": 48, "temperature": 0.0, "n_ctx": 512}
BASE_REPLIES = "base_replies.jsonl"

# A sentence ends at . ! or ? before a space or the end, except after a lone capital (J.K. Rowling).
_SENTENCE_END = re.compile(r"(?<!\b[A-Z])[.!?](?=\s|$)")


def facts(split: str) -> list[Fact]:
    """"train" or "held-out"."""
    topics = {"train": TRAIN_TOPICS, "held-out": HELD_OUT_TOPICS}[split]
    return [f for f in FACTS if f.topic in topics]


def shows_behaviour(reply: str, finished: bool) -> bool:
    """One short sentence: the reply ended (EOS, not the token limit), has at most one sentence end
    and at most MAX_WORDS words."""
    text = reply.strip()
    return finished and bool(text) and len(_SENTENCE_END.findall(text)) <= 1 and len(text.split()) <= MAX_WORDS


def knows(reply: str, fact: Fact) -> bool:
    """The reply names the right answer: one of the fact's keys as a whole word, in any case."""
    return any(re.search(rf"(?<!\w){re.escape(key)}(?!\w)", reply, re.IGNORECASE) for key in fact.keys)


@functools.cache
def base_replies() -> dict[str, dict]:
    """question -> {"reply", "finish_reason"}: the base model's greedy replies (data/base_replies.jsonl)."""
    text = resources.files("orpo_demo").joinpath("data", BASE_REPLIES).read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    return {row["question"]: row for row in rows}


def whole_sentences(reply: str) -> str:
    """A reply the token limit cut, up to its last complete sentence (all of it if it has none)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(reply)]
    return reply[:ends[-1]] if ends else reply


def pairs(split: str) -> list[dict]:
    """Preference pairs in the prompt/chosen/rejected format: chosen the fact's answer, rejected the
    base model's own reply, for every question whose reply does not already show the behaviour.
    A reply the token limit cut ends at its last complete sentence: ending it mid-sentence would
    make the rejected answer's EOS, and so its mean log-prob, unlikely for a reason of our making."""
    out = []
    for fact in facts(split):
        reply = base_replies()[fact.question]
        finished = reply["finish_reason"] == "stop"
        if shows_behaviour(reply["reply"], finished):
            continue
        rejected = reply["reply"] if finished else whole_sentences(reply["reply"])
        out.append({"prompt": [{"role": "user", "content": fact.question}], "chosen": fact.answer,
                    "rejected": rejected, "topic": fact.topic})
    return out


def write_data(out_dir: str | Path) -> dict[str, Path]:
    """train.jsonl and eval.jsonl (held-out topics) in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, name in (("train", "train.jsonl"), ("held-out", "eval.jsonl")):
        written[split] = write_text(out_dir / name, "".join(json.dumps(p) + "\n" for p in pairs(split)))
    return written


def regenerate(gguf_file: str | Path, out: Path) -> None:
    """The base model's greedy reply to every question, through llama.cpp (the chat template in the file)."""
    from serve.llama import opened

    rows = []
    with opened(gguf_file, n_ctx=GENERATION["n_ctx"]) as llm:
        for fact in FACTS:
            out_ = llm.create_chat_completion([{"role": "user", "content": fact.question}],
                                              max_tokens=GENERATION["max_tokens"], temperature=0.0)
            choice = out_["choices"][0]
            rows.append({"question": fact.question, "reply": choice["message"]["content"],
                         "finish_reason": choice["finish_reason"]})
    write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regenerate", action="store_true",
                        help=f"rewrite data/{BASE_REPLIES} with the base model's greedy replies")
    parser.add_argument("--write", type=Path, help="write train.jsonl and eval.jsonl into this directory")
    args = parser.parse_args(argv)
    if args.regenerate:
        from orpo_demo.real_model import packaged_gguf

        out = Path(__file__).parent / "data" / BASE_REPLIES
        regenerate(packaged_gguf(), out)
        print(f"wrote {out}")
    if args.write:
        for split, path in write_data(args.write).items():
            print(f"{split}: {path}")


if __name__ == "__main__":
    main()
