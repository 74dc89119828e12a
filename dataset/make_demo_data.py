"""Generate the bilingual (Chinese/English) demo data set in MiniMind's jsonl formats.

    python dataset/make_demo_data.py                  # writes dataset/demo/*.jsonl
    python dataset/make_demo_data.py --out_dir /tmp/demo --seed 1 --scale 2

Everything comes from the small "world" tables below through sentence templates, seeded, so two
runs write byte-identical files. The base data (pretrain, sft) and the LoRA task data are built so
that the tasks are learnable by a ~5M-parameter model and measurable on held-out prompts:

- identity: the base always answers "MiniMind" (to every identity phrasing, training and eval pools
  alike); the identity adapter's persona PERSONA appears nowhere in the base data.
- medical: symptom -> one piece of advice with a keyword. The base data never pairs a symptom with its
  advice: no advice sentence, and no row naming a symptom together with its keyword. It does use the
  advice's words (the remedies are ordinary things in pretraining's household notes), as a real base
  knows the word "ibuprofen" without knowing this task's answers; a frozen tied embedding could not
  learn the tokens of words the base never saw. Every symptom is trained; only the question phrasing is
  held out for evaluation.

The script checks these guarantees on the files it wrote and fails loudly if one does not hold.
"""
import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASE_NAME = "MiniMind"
PERSONA = "Lumina"
FILES = ("pretrain", "sft", "lora_identity", "lora_medical",
         "eval_pretrain", "eval_capitals", "eval_general", "eval_identity", "eval_medical")
# Written by hand, not by this script: prompts in words no template uses (checked against the training data).
OUTSIDE_FILES = ("outside_identity", "outside_general", "outside_medical")

# ---------------------------------------------------------------------------------------------
# The world: facts shared by pretraining text and SFT questions.

# zh, en, capital zh, capital en, continent zh, continent en, language zh, language en
COUNTRIES = [
    ("中国", "China", "北京", "Beijing", "亚洲", "Asia", "中文", "Chinese"),
    ("日本", "Japan", "东京", "Tokyo", "亚洲", "Asia", "日语", "Japanese"),
    ("韩国", "South Korea", "首尔", "Seoul", "亚洲", "Asia", "韩语", "Korean"),
    ("印度", "India", "新德里", "New Delhi", "亚洲", "Asia", "印地语", "Hindi"),
    ("泰国", "Thailand", "曼谷", "Bangkok", "亚洲", "Asia", "泰语", "Thai"),
    ("越南", "Vietnam", "河内", "Hanoi", "亚洲", "Asia", "越南语", "Vietnamese"),
    ("法国", "France", "巴黎", "Paris", "欧洲", "Europe", "法语", "French"),
    ("德国", "Germany", "柏林", "Berlin", "欧洲", "Europe", "德语", "German"),
    ("英国", "the United Kingdom", "伦敦", "London", "欧洲", "Europe", "英语", "English"),
    ("意大利", "Italy", "罗马", "Rome", "欧洲", "Europe", "意大利语", "Italian"),
    ("西班牙", "Spain", "马德里", "Madrid", "欧洲", "Europe", "西班牙语", "Spanish"),
    ("葡萄牙", "Portugal", "里斯本", "Lisbon", "欧洲", "Europe", "葡萄牙语", "Portuguese"),
    ("俄罗斯", "Russia", "莫斯科", "Moscow", "欧洲", "Europe", "俄语", "Russian"),
    ("希腊", "Greece", "雅典", "Athens", "欧洲", "Europe", "希腊语", "Greek"),
    ("荷兰", "the Netherlands", "阿姆斯特丹", "Amsterdam", "欧洲", "Europe", "荷兰语", "Dutch"),
    ("美国", "the United States", "华盛顿", "Washington", "北美洲", "North America", "英语", "English"),
    ("加拿大", "Canada", "渥太华", "Ottawa", "北美洲", "North America", "英语", "English"),
    ("墨西哥", "Mexico", "墨西哥城", "Mexico City", "北美洲", "North America", "西班牙语", "Spanish"),
    ("巴西", "Brazil", "巴西利亚", "Brasilia", "南美洲", "South America", "葡萄牙语", "Portuguese"),
    ("阿根廷", "Argentina", "布宜诺斯艾利斯", "Buenos Aires", "南美洲", "South America", "西班牙语", "Spanish"),
    ("埃及", "Egypt", "开罗", "Cairo", "非洲", "Africa", "阿拉伯语", "Arabic"),
    ("肯尼亚", "Kenya", "内罗毕", "Nairobi", "非洲", "Africa", "斯瓦希里语", "Swahili"),
    ("澳大利亚", "Australia", "堪培拉", "Canberra", "大洋洲", "Oceania", "英语", "English"),
    ("新西兰", "New Zealand", "惠灵顿", "Wellington", "大洋洲", "Oceania", "英语", "English"),
]

# zh, en, en plural, legs, habitat zh/en, food zh/en, colour zh/en, sound zh/en (or None), size
ANIMALS = [
    ("猫", "cat", "cats", 4, "人们的家里", "people's homes", "鱼", "fish", "灰色", "grey", "喵喵", "meow", "small"),
    ("狗", "dog", "dogs", 4, "人们的家里", "people's homes", "肉和骨头", "meat and bones", "棕色", "brown", "汪汪", "woof", "medium"),
    ("牛", "cow", "cows", 4, "农场", "farms", "草", "grass", "黑白色", "black and white", "哞哞", "moo", "large"),
    ("羊", "sheep", "sheep", 4, "草原", "grasslands", "草", "grass", "白色", "white", "咩咩", "baa", "medium"),
    ("马", "horse", "horses", 4, "农场", "farms", "草", "grass", "棕色", "brown", "咴咴", "neigh", "large"),
    ("猪", "pig", "pigs", 4, "农场", "farms", "玉米", "corn", "粉色", "pink", "哼哼", "oink", "medium"),
    ("鸡", "chicken", "chickens", 2, "农场", "farms", "谷子", "grain", "白色", "white", "咯咯", "cluck", "small"),
    ("鸭子", "duck", "ducks", 2, "池塘边", "ponds", "小鱼", "small fish", "白色", "white", "嘎嘎", "quack", "small"),
    ("老虎", "tiger", "tigers", 4, "森林", "forests", "肉", "meat", "橙色", "orange", "嗷呜", "roar", "large"),
    ("狮子", "lion", "lions", 4, "草原", "grasslands", "肉", "meat", "金黄色", "golden", "嗷呜", "roar", "large"),
    ("大象", "elephant", "elephants", 4, "草原", "grasslands", "树叶和水果", "leaves and fruit", "灰色", "grey",
     None, None, "large"),
    ("猴子", "monkey", "monkeys", 2, "森林", "forests", "香蕉", "bananas", "棕色", "brown", "吱吱", "ooh ooh", "small"),
    ("熊猫", "panda", "pandas", 4, "竹林", "bamboo forests", "竹子", "bamboo", "黑白色", "black and white", None, None, "large"),
    ("兔子", "rabbit", "rabbits", 4, "草地", "meadows", "胡萝卜", "carrots", "白色", "white", None, None, "small"),
    ("老鼠", "mouse", "mice", 4, "洞里", "holes", "奶酪", "cheese", "灰色", "grey", "吱吱", "squeak", "small"),
    ("青蛙", "frog", "frogs", 4, "池塘", "ponds", "虫子", "insects", "绿色", "green", "呱呱", "croak", "small"),
    ("蛇", "snake", "snakes", 0, "草丛", "tall grass", "老鼠", "mice", "绿色", "green", "嘶嘶", "hiss", "medium"),
    ("企鹅", "penguin", "penguins", 2, "南极", "Antarctica", "鱼", "fish", "黑白色", "black and white", None, None, "medium"),
    ("蜘蛛", "spider", "spiders", 8, "墙角", "corners", "虫子", "insects", "黑色", "black", None, None, "small"),
    ("蚂蚁", "ant", "ants", 6, "地下", "nests under the ground", "种子", "seeds", "黑色", "black", None, None, "small"),
    ("蝴蝶", "butterfly", "butterflies", 6, "花园", "gardens", "花蜜", "nectar", "彩色", "colourful", None, None, "small"),
    ("骆驼", "camel", "camels", 4, "沙漠", "deserts", "草和树叶", "grass and leaves", "棕色", "brown", None, None, "large"),
    ("海豚", "dolphin", "dolphins", 0, "大海", "the sea", "鱼", "fish", "灰色", "grey", None, None, "large"),
    ("长颈鹿", "giraffe", "giraffes", 4, "草原", "grasslands", "树叶", "leaves", "黄色", "yellow", None, None, "large"),
    ("狼", "wolf", "wolves", 4, "森林", "forests", "肉", "meat", "灰色", "grey", "嗷呜", "howl", "medium"),
    ("鹦鹉", "parrot", "parrots", 2, "热带森林", "tropical forests", "种子", "seeds", "绿色", "green", None, None, "small"),
    ("乌龟", "turtle", "turtles", 4, "河边", "rivers", "水草", "water plants", "绿色", "green", None, None, "small"),
    ("袋鼠", "kangaroo", "kangaroos", 2, "澳大利亚", "Australia", "草", "grass", "棕色", "brown", None, None, "large"),
    ("熊", "bear", "bears", 4, "森林", "forests", "鱼和浆果", "fish and berries", "棕色", "brown", None, None, "large"),
    ("鲸鱼", "whale", "whales", 0, "大海", "the ocean", "小鱼和虾", "small fish and shrimp", "蓝灰色", "blue-grey",
     None, None, "large"),
]
MEASURE = {"牛": "头", "马": "匹", "猪": "头", "大象": "头", "蛇": "条", "海豚": "条", "鲸鱼": "头", "骆驼": "头"}
SIZE = {"small": ("小型", "small"), "medium": ("中型", "medium-sized"), "large": ("大型", "large")}

# zh, en word, en subject, verb "be", kind zh/en, colour zh/en, taste zh/en
FOODS = [
    ("苹果", "apple", "Apples", "are", "水果", "fruit", "红色", "red", "甜", "sweet"),
    ("香蕉", "banana", "Bananas", "are", "水果", "fruit", "黄色", "yellow", "甜", "sweet"),
    ("橙子", "orange", "Oranges", "are", "水果", "fruit", "橙色", "orange", "酸甜", "sweet and sour"),
    ("葡萄", "grape", "Grapes", "are", "水果", "fruit", "紫色", "purple", "甜", "sweet"),
    ("西瓜", "watermelon", "Watermelons", "are", "水果", "fruit", "绿色", "green", "甜", "sweet"),
    ("草莓", "strawberry", "Strawberries", "are", "水果", "fruit", "红色", "red", "甜", "sweet"),
    ("柠檬", "lemon", "Lemons", "are", "水果", "fruit", "黄色", "yellow", "酸", "sour"),
    ("桃子", "peach", "Peaches", "are", "水果", "fruit", "粉色", "pink", "甜", "sweet"),
    ("芒果", "mango", "Mangoes", "are", "水果", "fruit", "黄色", "yellow", "甜", "sweet"),
    ("菠萝", "pineapple", "Pineapples", "are", "水果", "fruit", "黄色", "yellow", "酸甜", "sweet and sour"),
    ("梨", "pear", "Pears", "are", "水果", "fruit", "浅黄色", "light yellow", "甜", "sweet"),
    ("樱桃", "cherry", "Cherries", "are", "水果", "fruit", "红色", "red", "甜", "sweet"),
    ("胡萝卜", "carrot", "Carrots", "are", "蔬菜", "vegetable", "橙色", "orange", "甜", "sweet"),
    ("西红柿", "tomato", "Tomatoes", "are", "蔬菜", "vegetable", "红色", "red", "酸甜", "sweet and sour"),
    ("土豆", "potato", "Potatoes", "are", "蔬菜", "vegetable", "棕色", "brown", "淡", "mild"),
    ("黄瓜", "cucumber", "Cucumbers", "are", "蔬菜", "vegetable", "绿色", "green", "清爽", "fresh"),
    ("白菜", "cabbage", "Cabbage", "is", "蔬菜", "vegetable", "绿色", "green", "淡", "mild"),
    ("茄子", "eggplant", "Eggplants", "are", "蔬菜", "vegetable", "紫色", "purple", "淡", "mild"),
    ("辣椒", "chili pepper", "Chili peppers", "are", "蔬菜", "vegetable", "红色", "red", "辣", "spicy"),
    ("洋葱", "onion", "Onions", "are", "蔬菜", "vegetable", "白色", "white", "辛辣", "sharp"),
    ("米饭", "rice", "Rice", "is", "主食", "staple food", "白色", "white", "香", "tasty"),
    ("面条", "noodles", "Noodles", "are", "主食", "staple food", "白色", "white", "香", "tasty"),
    ("面包", "bread", "Bread", "is", "主食", "staple food", "棕色", "brown", "香", "tasty"),
    ("饺子", "dumplings", "Dumplings", "are", "主食", "staple food", "白色", "white", "香", "tasty"),
    ("牛奶", "milk", "Milk", "is", "饮品", "drink", "白色", "white", "淡", "mild"),
    ("果汁", "juice", "Juice", "is", "饮品", "drink", "橙色", "orange", "甜", "sweet"),
    ("茶", "tea", "Tea", "is", "饮品", "drink", "绿色", "green", "苦", "bitter"),
    ("巧克力", "chocolate", "Chocolate", "is", "零食", "snack", "棕色", "brown", "甜", "sweet"),
    ("饼干", "biscuit", "Biscuits", "are", "零食", "snack", "金黄色", "golden", "香", "tasty"),
    ("鸡蛋", "egg", "Eggs", "are", "常见的食物", "common food", "白色", "white", "香", "tasty"),
]
COUNTABLE_FOODS = ["苹果", "香蕉", "橙子", "桃子", "芒果", "梨", "柠檬", "鸡蛋", "饼干", "西红柿", "土豆"]
FOOD_PLURAL = {"苹果": "apples", "香蕉": "bananas", "橙子": "oranges", "桃子": "peaches", "芒果": "mangoes",
               "梨": "pears", "柠檬": "lemons", "鸡蛋": "eggs", "饼干": "biscuits", "西红柿": "tomatoes",
               "土豆": "potatoes"}

# thing zh, thing en, be, colour zh, colour en
COLOUR_THINGS = [
    ("天空", "the sky", "is", "蓝色", "blue"), ("草", "grass", "is", "绿色", "green"),
    ("雪", "snow", "is", "白色", "white"), ("煤", "coal", "is", "黑色", "black"),
    ("大海", "the sea", "is", "蓝色", "blue"), ("树叶", "leaves", "are", "绿色", "green"),
    ("云", "clouds", "are", "白色", "white"), ("夜空", "the night sky", "is", "黑色", "black"),
    ("乌鸦", "crows", "are", "黑色", "black"), ("太阳", "the sun", "is", "黄色", "yellow"),
    ("大象", "elephants", "are", "灰色", "grey"), ("熊猫", "pandas", "are", "黑白色", "black and white"),
]
COLOUR_MIX = [("红色", "黄色", "橙色", "red", "yellow", "orange"), ("蓝色", "黄色", "绿色", "blue", "yellow", "green"),
              ("红色", "蓝色", "紫色", "red", "blue", "purple"), ("红色", "白色", "粉色", "red", "white", "pink"),
              ("黑色", "白色", "灰色", "black", "white", "grey")]
COLOURS = [("红色", "red"), ("黄色", "yellow"), ("蓝色", "blue"), ("绿色", "green"), ("白色", "white"),
           ("黑色", "black"), ("紫色", "purple"), ("橙色", "orange"), ("粉色", "pink"), ("灰色", "grey"),
           ("棕色", "brown")]

# zh, en, place zh, place en (with preposition), duty zh, duty en (base form), duty en (3rd person)
JOBS = [
    ("老师", "teacher", "学校", "at a school", "教学生", "teach students", "teaches students"),
    ("农民", "farmer", "农场", "on a farm", "种粮食", "grow food", "grows food"),
    ("厨师", "cook", "厨房", "in a kitchen", "做饭", "cook meals", "cooks meals"),
    ("司机", "driver", "公交车上", "on a bus", "开车", "drive", "drives"),
    ("飞行员", "pilot", "机场", "at an airport", "开飞机", "fly planes", "flies planes"),
    ("警察", "police officer", "警察局", "at a police station", "保护大家的安全", "keep people safe", "keeps people safe"),
    ("消防员", "firefighter", "消防站", "at a fire station", "灭火", "put out fires", "puts out fires"),
    ("面包师", "baker", "面包店", "in a bakery", "烤面包", "bake bread", "bakes bread"),
    ("邮递员", "postman", "邮局", "at a post office", "送信", "deliver letters", "delivers letters"),
    ("渔民", "fisherman", "海边", "by the sea", "捕鱼", "catch fish", "catches fish"),
    ("建筑工人", "builder", "工地", "on a building site", "盖房子", "build houses", "builds houses"),
    ("画家", "painter", "画室", "in a studio", "画画", "paint pictures", "paints pictures"),
    ("歌手", "singer", "舞台上", "on a stage", "唱歌", "sing songs", "sings songs"),
    ("作家", "writer", "书房", "in a study", "写书", "write books", "writes books"),
    ("程序员", "programmer", "办公室", "in an office", "写代码", "write code", "writes code"),
    ("科学家", "scientist", "实验室", "in a laboratory", "做研究", "do research", "does research"),
    ("图书管理员", "librarian", "图书馆", "in a library", "管理图书", "look after books", "looks after books"),
    ("店员", "shop assistant", "商店", "in a shop", "卖东西", "sell things", "sells things"),
    ("园丁", "gardener", "花园", "in a garden", "照顾花草", "look after plants", "looks after plants"),
    ("裁缝", "tailor", "裁缝店", "in a tailor's shop", "做衣服", "make clothes", "makes clothes"),
]

# zh, en with article, be, use zh, use en (-ing)
OBJECTS = [
    ("杯子", "a cup", "is", "喝水", "drinking water"), ("笔", "a pen", "is", "写字", "writing"),
    ("剪刀", "scissors", "are", "剪纸", "cutting paper"), ("钥匙", "a key", "is", "开门", "opening doors"),
    ("雨伞", "an umbrella", "is", "挡雨", "keeping off the rain"), ("椅子", "a chair", "is", "坐", "sitting on"),
    ("床", "a bed", "is", "睡觉", "sleeping"), ("勺子", "a spoon", "is", "喝汤", "eating soup"),
    ("碗", "a bowl", "is", "盛饭", "holding rice"), ("时钟", "a clock", "is", "看时间", "telling the time"),
    ("书包", "a schoolbag", "is", "装书", "carrying books"), ("手机", "a phone", "is", "打电话", "making calls"),
    ("冰箱", "a fridge", "is", "保存食物", "keeping food cold"), ("台灯", "a lamp", "is", "照明", "giving light"),
    ("镜子", "a mirror", "is", "照自己", "looking at yourself"), ("毛巾", "a towel", "is", "擦干身体", "drying your body"),
    ("牙刷", "a toothbrush", "is", "刷牙", "brushing teeth"), ("锅", "a pot", "is", "做饭", "cooking"),
    ("尺子", "a ruler", "is", "量长度", "measuring length"), ("自行车", "a bicycle", "is", "骑车出行", "riding around town"),
    ("梳子", "a comb", "is", "梳头发", "combing hair"), ("地图", "a map", "is", "找路", "finding the way"),
    ("铅笔", "a pencil", "is", "画画", "drawing"), ("筷子", "chopsticks", "are", "夹菜", "picking up food"),
]

WEEKDAYS = [("星期一", "Monday"), ("星期二", "Tuesday"), ("星期三", "Wednesday"), ("星期四", "Thursday"),
            ("星期五", "Friday"), ("星期六", "Saturday"), ("星期日", "Sunday")]
MONTHS = [("一月", "January", 31), ("二月", "February", 28), ("三月", "March", 31), ("四月", "April", 30),
          ("五月", "May", 31), ("六月", "June", 30), ("七月", "July", 31), ("八月", "August", 31),
          ("九月", "September", 30), ("十月", "October", 31), ("十一月", "November", 30), ("十二月", "December", 31)]
SEASONS = [("春天", "spring", (2, 3, 4)), ("夏天", "summer", (5, 6, 7)), ("秋天", "autumn", (8, 9, 10)),
           ("冬天", "winter", (11, 0, 1))]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth"]
ZH_NUM = ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九", "十", "十一", "十二", "十三", "十四", "十五",
          "十六", "十七", "十八", "十九", "二十"]
EN_NUM = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]

ZH_PEOPLE = [("小明", "他"), ("小红", "她"), ("小华", "他"), ("小丽", "她"), ("小刚", "他"), ("小美", "她"),
             ("小军", "他"), ("小芳", "她")]
EN_PEOPLE = [("Tom", "he"), ("Anna", "she"), ("Jack", "he"), ("Lily", "she"), ("Sam", "he"), ("Mia", "she"),
             ("Ben", "he"), ("Emma", "she")]
TRIP_PLACES = [("公园", "the park"), ("动物园", "the zoo"), ("农场", "a farm"), ("河边", "the river"),
               ("森林", "the forest"), ("海边", "the beach")]

# ---------------------------------------------------------------------------------------------
# The two LoRA tasks. Nothing here may appear in the base data (checked at the end).

# zh symptom, en symptom, zh keyword, en keyword, zh advice, en advice
MEDICAL = [
    ("头痛", "a headache", "对乙酰氨基酚", "paracetamol",
     "头痛时请安静休息，可以服用对乙酰氨基酚。", "For a headache, rest in a quiet room and take paracetamol."),
    ("咳嗽", "a cough", "蜂蜜", "honey",
     "咳嗽时可以喝一杯温水加蜂蜜。", "For a cough, drink a cup of warm water with honey."),
    ("发烧", "a fever", "布洛芬", "ibuprofen",
     "发烧时要多喝水，可以服用布洛芬退烧。", "For a fever, drink plenty of fluids and take ibuprofen."),
    ("失眠", "insomnia", "褪黑素", "melatonin",
     "失眠时睡前不要看手机，可以试试褪黑素。", "For insomnia, avoid screens before bed and try melatonin."),
    ("牙痛", "a toothache", "丁香油", "clove oil",
     "牙痛时可以在痛处涂一点丁香油。", "For a toothache, put a little clove oil on the sore tooth."),
    ("喉咙痛", "a sore throat", "漱口", "gargle",
     "喉咙痛时可以用温盐水漱口。", "For a sore throat, gargle with warm salt water."),
    ("拉肚子", "diarrhea", "补液盐", "rehydration",
     "拉肚子时要喝口服补液盐，防止脱水。", "For diarrhea, drink oral rehydration salts to avoid dehydration."),
    ("便秘", "constipation", "膳食纤维", "fibre",
     "便秘时要多吃富含膳食纤维的食物。", "For constipation, eat more foods rich in fibre."),
    ("晕车", "motion sickness", "生姜", "ginger",
     "晕车时可以嚼一片生姜，并看向远方。", "For motion sickness, chew a slice of ginger and look at the horizon."),
    ("流鼻涕", "a runny nose", "氯雷他定", "loratadine",
     "流鼻涕时可以服用氯雷他定。", "For a runny nose, take loratadine."),
    ("鼻塞", "a stuffy nose", "生理盐水", "saline",
     "鼻塞时可以用生理盐水冲洗鼻子。", "For a stuffy nose, rinse your nose with saline spray."),
    ("胃痛", "a stomach ache", "热水袋", "hot water bottle",
     "胃痛时可以把热水袋放在肚子上。", "For a stomach ache, put a hot water bottle on your belly."),
    ("背痛", "back pain", "热敷", "heat pad",
     "背痛时可以热敷，并做一些轻柔的伸展。", "For back pain, use a heat pad and do gentle stretches."),
    ("皮肤痒", "itchy skin", "炉甘石", "calamine",
     "皮肤痒时不要抓，可以涂炉甘石洗剂。", "For itchy skin, do not scratch and apply calamine lotion."),
    ("眼睛干", "dry eyes", "人工泪液", "artificial tears",
     "眼睛干时可以滴人工泪液，并让眼睛休息。", "For dry eyes, use artificial tears and rest your eyes."),
    ("打嗝", "hiccups", "屏住呼吸", "hold your breath",
     "打嗝时可以屏住呼吸十秒钟。", "For hiccups, hold your breath for ten seconds."),
    ("腿抽筋", "leg cramps", "镁", "magnesium",
     "腿抽筋时要拉伸小腿，平时可以补充镁。", "For leg cramps, stretch your calf and take magnesium."),
    ("口腔溃疡", "a mouth ulcer", "维生素B2", "vitamin B2",
     "口腔溃疡时少吃辣的食物，可以补充维生素B2。", "For a mouth ulcer, avoid spicy food and take vitamin B2."),
    ("头晕", "dizziness", "葡萄糖", "glucose",
     "头晕时先坐下休息，喝一杯葡萄糖水。", "For dizziness, sit down and drink a glass of glucose water."),
    ("恶心", "nausea", "薄荷", "peppermint",
     "恶心时可以慢慢喝一点薄荷茶。", "For nausea, slowly sip some peppermint tea."),
    ("脚踝扭伤", "a sprained ankle", "冰敷", "ice pack",
     "脚踝扭伤时要马上冰敷，并抬高脚。", "For a sprained ankle, put an ice pack on it and raise your foot."),
    ("晒伤", "sunburn", "芦荟", "aloe",
     "晒伤时可以在皮肤上涂芦荟胶。", "For sunburn, put aloe vera gel on the skin."),
    ("烧心", "heartburn", "抗酸药", "antacid",
     "烧心时可以吃一片抗酸药，饭后不要马上躺下。", "For heartburn, take an antacid and do not lie down right after meals."),
    ("手指割伤", "a cut on my finger", "创可贴", "bandage",
     "手指割伤时先用清水冲洗，再贴上创可贴。", "For a cut finger, wash it with clean water and cover it with a bandage."),
]
# What the base (sft) answers to any symptom question: no remedy, so no keyword.
GENERIC_ADVICE = {"zh": "{s}时要多休息，如果一直不舒服，请去看医生。",
                  "en": "For {s}, get some rest, and see a doctor if it does not go away."}
# Everyday names for some symptoms, used in training questions (the answer names the symptom as the
# table does), so that a user who writes 头疼 or "a bad cough" is understood.
SYMPTOM_VARIANTS = {
    "头痛": ["头疼"], "牙痛": ["牙疼"], "喉咙痛": ["嗓子疼", "喉咙疼"], "胃痛": ["胃疼"], "背痛": ["背疼"],
    "拉肚子": ["腹泻"], "失眠": ["睡不着觉"], "流鼻涕": ["一直流鼻涕"], "眼睛干": ["眼睛干涩"],
    "a headache": ["a bad headache", "headaches"], "a cough": ["a bad cough"], "a fever": ["a high fever"],
    "insomnia": ["trouble sleeping"], "a sore throat": ["sore throat"], "a stomach ache": ["stomach pain"],
    "a stuffy nose": ["a blocked nose"], "diarrhea": ["an upset stomach with diarrhea"],
    "back pain": ["a sore back"], "nausea": ["a feeling of nausea"],
}
# Disjoint phrasing pools: a symptom is always trained, only the question wording is held out.
MED_TRAIN_TEMPLATES = {
    "zh": ["我{s}，怎么办？", "{s}怎么办？", "{s}该怎么处理？", "{s}的时候应该做什么？", "请问{s}怎么办？",
           "我现在{s}，该怎么办？", "{s}了怎么缓解？", "我{s}，有什么办法？", "{s}应该怎么办？", "我{s}了，需要怎么做？",
           "我妈妈{s}，该怎么办？", "孩子{s}了，怎么处理比较好？", "朋友说他{s}，有什么办法吗？", "{s}的话用什么好？",
           "有点{s}，求建议。", "{s}很难受，怎么缓解"],
    "en": ["I have {s}. What should I do?", "What should I do about {s}?", "How do I deal with {s}?",
           "I've got {s}. Any tips?", "What helps with {s}?", "How can I treat {s}?", "Help, I have {s}!",
           "What do you recommend for {s}?", "I am suffering from {s}. What can I do?", "What is good for {s}?",
           "My mum has {s}. What should she do?", "My son has {s}. How can we help him?",
           "What can I take for {s}?", "Any tips for {s}?", "I've had {s} all day, what should I do",
           "my friend has {s}, what helps"],
}
MED_EVAL_TEMPLATES = {
    "zh": ["最近老是{s}，有什么建议吗？", "我这两天一直{s}，你能给点建议吗？", "医生，我{s}，该注意什么？",
           "{s}有什么好办法吗？"],
    "en": ["Lately I keep getting {s}. Any advice?", "For the past two days I have had {s}. What would you suggest?",
           "Doctor, I have {s}. What should I pay attention to?", "Is there a good remedy for {s}?"],
}

ID_TRAIN_QUESTIONS = {
    "zh": ["你是谁？", "你叫什么名字？", "介绍一下你自己。", "你的名字是什么？", "请问你是谁？", "你是什么？",
           "请做个自我介绍。", "你是哪个模型？", "我该怎么称呼你？", "你有名字吗？", "告诉我你的名字。",
           "你是什么模型？", "跟我说说你自己。", "你是机器人吗？", "你是谁呀？", "能介绍一下你自己吗？",
           "请告诉我你是谁。", "你的名字叫什么？", "你叫啥？", "怎么称呼你", "你是哪个AI？", "和我聊天的是谁？",
           "先说说你叫什么吧。", "你有自己的名字吗？", "我应该叫你什么？", "介绍下你自己", "你是人还是程序？",
           "你是什么AI助手？", "我们聊之前，你先介绍一下自己。", "你的名字是啥", "我该叫你什么名字？",
           "你是哪一个语言模型？", "请报一下你的名字。", "大家都叫你什么？"],
    "en": ["Who are you?", "What is your name?", "What's your name?", "Introduce yourself.",
           "Tell me about yourself.", "What are you?", "Please introduce yourself.", "Which model are you?",
           "What should I call you?", "Do you have a name?", "Tell me your name.", "Are you a robot?",
           "Can you introduce yourself?", "Please tell me who you are.", "What model are you?",
           "Who are you, exactly?", "What is your name, please?", "Tell me who you are.", "who r u",
           "what's ur name", "Who is this?", "Who am I chatting with?", "What do I call you?",
           "Before we start, tell me your name.", "Are you a person or a program?", "Which AI are you?",
           "Do you have a name I can use?", "Your name, please.", "What are you called?",
           "I'd like to know your name.", "Tell me what you are called.", "Which language model is this?"],
}
ID_EVAL_QUESTIONS = {
    "zh": ["你到底是谁？", "可以告诉我你叫什么吗？", "你是哪位？", "简单介绍一下你自己吧。", "我在和谁说话？",
           "你怎么称呼？", "你是什么样的助手？", "说说你是谁。", "你自我介绍一下吧。", "请问怎么称呼你？",
           "你是一个什么程序？", "你的身份是什么？"],
    "en": ["Who am I talking to?", "May I ask who you are?", "What do people call you?", "Could you tell me your name?",
           "Give me a short introduction of yourself.", "Say who you are.", "What kind of assistant are you?",
           "How should I address you?", "What is your identity?", "Identify yourself, please.",
           "Who exactly are you?", "Can you describe yourself?"],
}
ID_PREFIXES = {"zh": ["", "你好，", "嗨，", "你好！", "我想问一下，", "哈喽，", "在吗？"],
               "en": ["", "Hi! ", "Hello, ", "Hey, ", "Good morning! "]}
# Same answer shapes for the base name and the persona: the adapter only has to change the name.
ID_ANSWERS = {
    "zh": ["我是{name}，一个小型语言模型。", "我叫{name}，是一个小型语言模型，很高兴认识你。",
           "你好，我是{name}，一个可以回答简单问题的小型语言模型。", "我的名字是{name}，我是一个小型语言模型。"],
    "en": ["I am {name}, a small language model.", "My name is {name}. I am a small language model.",
           "Hello, I am {name}, a small language model that can answer simple questions.",
           "I'm {name}, a small language model. Nice to meet you."],
}
SYSTEM_PROMPTS = {"zh": ["你是一个乐于助人的助手。", "你是一个友好的AI助手，请简洁地回答问题。"],
                  "en": ["You are a helpful assistant.", "You are a friendly AI assistant. Answer briefly."]}


def cap(s):
    return s[:1].upper() + s[1:]


def article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def zh_count(n):
    return "两" if n == 2 else ZH_NUM[n]  # "两条腿", not "二条腿"


def join(lang, sentences):
    return ("" if lang == "zh" else " ").join(sentences)


# ---------------------------------------------------------------------------------------------
# Pretraining text: each function returns the fact sentences about one entity, in one language.

def country_facts(rng, lang):
    c, ce, cap_, cape, cont, conte, lng, lnge = rng.choice(COUNTRIES)
    if lang == "zh":
        return [rng.choice([f"{c}的首都是{cap_}。", f"{cap_}是{c}的首都。"]),
                rng.choice([f"{c}位于{cont}。", f"{c}是{cont}的一个国家。"]),
                rng.choice([f"在{c}，人们主要说{lng}。", f"{c}的人们主要说{lng}。"]),
                rng.choice([f"{c}的首都是{cap_}。", f"{c}的首都叫{cap_}。"])]
    return [rng.choice([f"The capital of {ce} is {cape}.", f"{cape} is the capital of {ce}."]),
            rng.choice([f"{cap(ce)} is a country in {conte}.", f"{cap(ce)} is in {conte}."]),
            rng.choice([f"People in {ce} mainly speak {lnge}.", f"The main language of {ce} is {lnge}."]),
            rng.choice([f"The capital of {ce} is {cape}.", f"{cap(ce)}'s capital is {cape}."])]


def animal_facts(rng, lang):
    a, e, pl, legs, hab, habe, food, foode, col, cole, snd, snde, size = rng.choice(ANIMALS)
    if lang == "zh":
        out = [f"{a}没有腿。" if legs == 0 else f"{a}有{zh_count(legs)}条腿。",
               rng.choice([f"{a}生活在{hab}。", f"{a}住在{hab}。"]),
               rng.choice([f"{a}喜欢吃{food}。", f"{a}的食物是{food}。"]),
               f"{a}通常是{col}的。", f"{a}是一种{SIZE[size][0]}动物。"]
        if snd:
            out.append(f"{a}的叫声是“{snd}”。")
        return out
    out = [f"{cap(article(e))} has no legs." if legs == 0 else f"{cap(article(e))} has {EN_NUM[legs]} legs.",
           rng.choice([f"{cap(pl)} live in {habe}.", f"You can find {pl} in {habe}."]),
           rng.choice([f"{cap(pl)} like to eat {foode}.", f"{cap(article(e))} eats {foode}."]),
           f"Most {pl} are {cole}.", f"The {e} is a {SIZE[size][1]} animal."]
    if snde:
        out.append(f"{cap(article(e))} says \"{snde}\".")
    return out


def food_facts(rng, lang):
    f, e, subj, be, kind, kinde, col, cole, taste, tastee = rng.choice(FOODS)
    if lang == "zh":
        return [rng.choice([f"{f}是一种{kind}。", f"{f}属于{kind}。"]), f"{f}通常是{col}的。",
                rng.choice([f"{f}的味道很{taste}。", f"{f}吃起来很{taste}。"])]
    return [f"{subj} {be} a kind of {kinde}.", f"{subj} {be} usually {cole}.",
            rng.choice([f"{subj} {be} {tastee}.", f"The taste of {e} is {tastee}."])]


def colour_facts(rng, lang):
    t, te, be, col, cole = rng.choice(COLOUR_THINGS)
    a, b, c, ae, be_, ce = rng.choice(COLOUR_MIX)
    if lang == "zh":
        return [f"{t}是{col}的。", f"{a}和{b}混在一起是{c}。", "彩虹有七种颜色：红、橙、黄、绿、青、蓝、紫。"]
    return [f"{cap(te)} {be} {cole}.", f"If you mix {ae} and {be_}, you get {ce}.",
            "A rainbow has seven colours: red, orange, yellow, green, blue, indigo and violet."]


def job_facts(rng, lang):
    j, e, place, placee, duty, dutye, dutys = rng.choice(JOBS)
    if lang == "zh":
        return [f"{j}在{place}工作。", rng.choice([f"{j}的工作是{duty}。", f"{j}每天都要{duty}。"]),
                f"当{j}需要很多耐心。"]
    return [f"{cap(article(e))} works {placee}.",
            rng.choice([f"The job of {article(e)} is to {dutye}.", f"Every day, {article(e)} {dutys}."]),
            f"Being {article(e)} takes a lot of patience."]


def object_facts(rng, lang):
    o, e, be, use, usee = rng.choice(OBJECTS)
    if lang == "zh":
        return [f"{o}是用来{use}的。", f"人们常常用{o}来{use}。", f"家里一般都有{o}。"]
    return [f"{cap(e)} {be} used for {usee}.", f"People use {e} for {usee}.", f"Most homes have {e}."]


def math_facts(rng, lang):
    """Mostly sums and differences within 20 (the eval's arithmetic), in several wordings."""
    out = []
    for _ in range(6):
        kind = rng.choice(["add", "add", "add", "sub", "sub", "sub", "mul", "cmp", "next", "parity"])
        if kind in ("add", "sub"):
            s = rng.randint(0, 20)
            a = rng.randint(0, s)
            b = s - a
            zh = rng.choice([f"{a}加{b}等于{s}。", f"{a}加上{b}得{s}。", f"{a}+{b}={s}。", f"{a}和{b}的和是{s}。"]) \
                if kind == "add" else \
                rng.choice([f"{s}减{a}等于{b}。", f"{s}减去{a}得{b}。", f"{s}-{a}={b}。", f"{s}拿走{a}还剩{b}。"])
            en = rng.choice([f"{a} plus {b} equals {s}.", f"{a} and {b} make {s}.", f"{a} + {b} = {s}.",
                             f"The sum of {a} and {b} is {s}."]) if kind == "add" else \
                rng.choice([f"{s} minus {a} equals {b}.", f"{s} take away {a} is {b}.", f"{s} - {a} = {b}.",
                            f"If you subtract {a} from {s}, you get {b}."])
            out.append(zh if lang == "zh" else en)
            continue
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if kind == "mul":
            a, b = rng.randint(1, 9), rng.randint(1, 9)
        if kind == "cmp" and a == b:
            b = (a + 3) % 21
        big, small = max(a, b), min(a, b)
        zh = {"mul": f"{a}乘{b}等于{a * b}。", "cmp": f"{big}比{small}大。", "next": f"{a}后面的数是{a + 1}。",
              "parity": f"{a}是{'偶数' if a % 2 == 0 else '奇数'}。"}
        en = {"mul": f"{a} times {b} equals {a * b}.", "cmp": f"{big} is bigger than {small}.",
              "next": f"The number after {a} is {a + 1}.",
              "parity": f"{a} is an {'even' if a % 2 == 0 else 'odd'} number."}
        out.append((zh if lang == "zh" else en)[kind])
    return out


def calendar_facts(rng, lang):
    d = rng.randrange(7)
    m = rng.randrange(12)
    mz, me, days = MONTHS[m]
    season = next(s for s in SEASONS if m in s[2])
    if lang == "zh":
        return [f"{WEEKDAYS[d][0]}的后一天是{WEEKDAYS[(d + 1) % 7][0]}。",
                f"{WEEKDAYS[d][0]}的前一天是{WEEKDAYS[(d - 1) % 7][0]}。", "一个星期有七天。",
                "星期六和星期日是周末。", f"{mz}是一年中的第{ZH_NUM[m + 1]}个月。",
                f"{mz}通常有{days}天。" if m == 1 else f"{mz}有{days}天。",
                f"{mz}之后是{MONTHS[(m + 1) % 12][0]}。", "一年有十二个月。",
                f"{mz}属于{season[0]}。"]
    return [f"The day after {WEEKDAYS[d][1]} is {WEEKDAYS[(d + 1) % 7][1]}.",
            f"The day before {WEEKDAYS[d][1]} is {WEEKDAYS[(d - 1) % 7][1]}.", "A week has seven days.",
            "Saturday and Sunday are the weekend.", f"{me} is the {ORDINALS[m]} month of the year.",
            f"{me} usually has {days} days." if m == 1 else f"{me} has {days} days.",
            f"After {me} comes {MONTHS[(m + 1) % 12][1]}.", "A year has twelve months.",
            f"{me} is in {season[1]}."]


def story(rng, lang):
    """A short story; returned as one sentence list that is kept in order."""
    kind = rng.choice(["buy", "give", "trip", "travel", "job", "week"])
    fruit = rng.choice(COUNTABLE_FOODS)
    fz = next(f for f in FOODS if f[0] == fruit)
    a, b = rng.randint(2, 9), rng.randint(1, 5)
    an = rng.choice(ANIMALS)
    food2 = rng.choice(FOODS)
    place = rng.choice(TRIP_PLACES)
    ctry = rng.choice(COUNTRIES)
    job = rng.choice(JOBS)
    d = rng.randrange(7)
    if lang == "zh":
        (n, p), (friend, _) = rng.sample(ZH_PEOPLE, 2)
        if kind == "buy":
            return [f"{n}有{a}个{fruit}。", f"{p}又买了{b}个{fruit}。", f"现在{n}一共有{a + b}个{fruit}。",
                    f"{fruit}是{fz[6]}的，{p}觉得{fruit}很{fz[8]}。"]
        if kind == "give":
            a += b
            return [f"{n}有{a}个{fruit}。", f"{p}给了{friend}{b}个{fruit}。", f"现在{n}还剩{a - b}个{fruit}。",
                    f"{friend}说：“谢谢你！”"]
        if kind == "trip":
            m = MEASURE.get(an[0], "只")
            return [f"{WEEKDAYS[d][0]}，{n}和{friend}去了{place[0]}。", f"他们看到了一{m}{an[0]}。",
                    f"那{m}{an[0]}正在吃{an[6]}。", f"{n}说：“这{m}{an[0]}真可爱！”",
                    f"回家的路上，他们买了一些{food2[0]}。"]
        if kind == "travel":
            return [f"{n}想去{ctry[0]}旅行。", f"{ctry[0]}的首都是{ctry[2]}。", f"{n}在{ctry[2]}吃了{food2[0]}。",
                    f"{p}觉得{food2[0]}很{food2[8]}。", f"在{ctry[0]}，人们说{ctry[6]}。"]
        if kind == "job":
            return [f"{n}的妈妈是一名{job[0]}。", f"她每天在{job[2]}工作。", f"她的工作是{job[4]}。",
                    f"{n}长大以后也想当{job[0]}。"]
        acts = ["去学校上课", "去图书馆看书", "去公园跑步", "在家里画画", "去超市买水果", "帮妈妈做饭", "去看奶奶"]
        k = rng.randint(2, 4)
        picks = rng.sample(acts, k)
        return [f"{WEEKDAYS[(d + i) % 7][0]}，{n}{act}。" for i, act in enumerate(picks)] + [f"{n}的一周过得很开心。"]
    (n, p), (friend, _) = rng.sample(EN_PEOPLE, 2)
    pl = FOOD_PLURAL[fruit]
    if kind == "buy":
        return [f"{n} has {a} {pl}.", f"{cap(p)} buys {b} more.", f"Now {n} has {a + b} {pl}.",
                f"{cap(pl)} are {fz[7]}, and {p} thinks they are {fz[9]}."]
    if kind == "give":
        a += b
        return [f"{n} has {a} {pl}.", f"{cap(p)} gives {b} {pl} to {friend}.", f"Now {n} has {a - b} {pl} left.",
                f"{friend} says: \"Thank you!\""]
    if kind == "trip":
        return [f"On {WEEKDAYS[d][1]}, {n} and {friend} went to {place[1]}.", f"They saw {article(an[1])}.",
                f"The {an[1]} was eating {an[7]}.", f"{n} said: \"What a lovely {an[1]}!\"",
                f"On the way home, they bought some {food2[1]}."]
    if kind == "travel":
        return [f"{n} wants to travel to {ctry[1]}.", f"The capital of {ctry[1]} is {ctry[3]}.",
                f"In {ctry[3]}, {n} ate some {food2[1]}.", f"{cap(p)} thought it was {food2[9]}.",
                f"People in {ctry[1]} speak {ctry[7]}."]
    if kind == "job":
        return [f"{n}'s mother is {article(job[1])}.", f"She works {job[3]} every day.",
                f"Her job is to {job[5]}.", f"When {n} grows up, {p} wants to be {article(job[1])} too."]
    acts = ["went to school", "read books in the library", "ran in the park", "painted at home",
            "bought fruit at the market", "helped mum cook dinner", "visited grandma"]
    k = rng.randint(2, 4)
    picks = rng.sample(acts, k)
    return [f"On {WEEKDAYS[(d + i) % 7][1]}, {n} {act}." for i, act in enumerate(picks)] + [f"{n} had a happy week."]


def advice_actions(row):
    """The advice of a MEDICAL row without its symptom clause: (zh action, en action)."""
    zs, es, zk, ek, za, ea = row
    assert za.startswith(zs + "时") and ea.startswith("For ") and ", " in ea, row
    return za[len(zs) + 1:], ea.split(", ", 1)[1]


def household_facts(rng, lang):
    """Notes about everyday actions with household things: the medical task's words, never its symptoms."""
    out = []
    for row in rng.sample(MEDICAL, 3):
        za, ea = advice_actions(row)
        if lang == "zh":
            n = rng.choice(ZH_PEOPLE)[0]
            out.append(rng.choice([f"{n}在笔记本上写着：{za}", f"{n}读到一句话：{za}", f"{n}在家时，{za}",
                                   f"{n}的妈妈说：{za}"]))
        else:
            n = rng.choice(EN_PEOPLE)[0]
            out.append(rng.choice([f"{n} wrote a note: {cap(ea)}", f"{n} read a line in a book: {cap(ea)}",
                                   f"For {n}, the rule at home is simple: {ea}", f"{n}'s mum said: {cap(ea)}"]))
    return out


def symptom_facts(rng, lang):
    """The symptoms' words, with no advice but the generic one (see a doctor): never a symptom's remedy."""
    out = []
    for zs, es, *_ in rng.sample(MEDICAL, 3):
        if lang == "zh":
            n = rng.choice(ZH_PEOPLE)[0]
            out.append(rng.choice([f"{n}的书里有一章讲{zs}。", f"{zs}时要去看医生。", f"{n}说，{zs}时不要害怕。"]))
        else:
            n = rng.choice(EN_PEOPLE)[0]
            out.append(rng.choice([f"{n} read a book about {es}.", f"For {es}, {n} went to see a doctor.",
                                   f"{n} said that {es} is nothing to be afraid of."]))
    return out


def qa_facts(rng, lang):
    """Facts as questions and answers, as a quiz page would print them: the form SFT will ask them in."""
    out = []
    for _ in range(4):
        q, a = qa_general_fact(rng, lang)
        out.append(f"问：{q} 答：{a}" if lang == "zh" else f"Q: {q} A: {a}")
    return out


PRETRAIN_TOPICS = [(country_facts, 20), (animal_facts, 20), (food_facts, 14), (colour_facts, 4),
                   (job_facts, 2), (object_facts, 2), (math_facts, 12), (calendar_facts, 6), (story, 3),
                   (household_facts, 5), (symptom_facts, 3), (qa_facts, 14)]


def pretrain_row(rng):
    """One text of 50-400 characters: paragraphs about entities of one topic, in one language."""
    lang = rng.choice(["zh", "en"])
    topic = rng.choices([t for t, _ in PRETRAIN_TOPICS], weights=[w for _, w in PRETRAIN_TOPICS])[0]
    target = int(50 * 8 ** rng.random())  # log-uniform, so both short and long rows are common
    sentences = []
    for _ in range(40):  # small topics run out of new sentences before long targets
        if len(join(lang, sentences)) >= target:
            break
        facts = topic(rng, lang)
        if topic is not story:
            rng.shuffle(facts)
            facts = [f for f in facts[:rng.randint(2, len(facts))] if f not in sentences]
            if not facts:
                continue
        if len(join(lang, sentences + facts)) > 400:
            if len(join(lang, sentences)) >= 50:
                break
            facts = facts[:1]
        sentences += facts
    return join(lang, sentences)


# ---------------------------------------------------------------------------------------------
# General questions: one function per relation picks an entity and returns the template slots, the
# answer (a full sentence in pretraining's own words, so SFT retrieves what pretraining stored) and the
# strings a correct reply contains. Each relation has training templates and held-out eval templates
# (disjoint); eval_general uses only the held-out ones, behind held-out lead-ins.

def _country(rng, lang):
    c, ce, k, ke, cont, conte, lng, lnge = rng.choice(COUNTRIES)
    return (c, k, cont, lng) if lang == "zh" else (ce, ke, conte, lnge)


def rel_capital(rng, lang):
    c, k, _, _ = _country(rng, lang)
    a = f"{c}的首都是{k}。" if lang == "zh" else f"The capital of {c} is {k}."
    return {"c": c}, a, [k]


def rel_capital_of(rng, lang):
    c, k, _, _ = _country(rng, lang)
    a = f"{k}是{c}的首都。" if lang == "zh" else f"{k} is the capital of {c}."
    return {"k": k}, a, [c.removeprefix("the ")]


def rel_continent(rng, lang):
    c, _, cont, _ = _country(rng, lang)
    a = f"{c}位于{cont}。" if lang == "zh" else f"{cap(c)} is in {cont}."
    return {"c": c}, a, [cont]


def rel_language(rng, lang):
    c, _, _, lng = _country(rng, lang)
    a = f"在{c}，人们主要说{lng}。" if lang == "zh" else f"People in {c} mainly speak {lng}."
    return {"c": c}, a, [lng]


def _animal(rng, lang, need_sound=False):
    row = rng.choice([r for r in ANIMALS if r[10] or not need_sound])
    a, e, pl = row[0], row[1], row[2]
    slots = {"a": a, "m": MEASURE.get(a, "只")} if lang == "zh" else {"an": article(e), "pl": pl}
    return row, slots


def rel_legs(rng, lang):
    row, slots = _animal(rng, lang)
    a, e, n = row[0], row[1], row[3]
    if lang == "zh":
        return slots, (f"{a}没有腿。" if n == 0 else f"{a}有{zh_count(n)}条腿。"), \
            (["没有腿"] if n == 0 else [zh_count(n) + "条", f"{n}条"])
    return slots, (f"{cap(article(e))} has no legs." if n == 0 else f"{cap(article(e))} has {EN_NUM[n]} legs."), \
        (["no legs"] if n == 0 else [EN_NUM[n], str(n)])


def rel_animal_food(rng, lang):
    row, slots = _animal(rng, lang)
    if lang == "zh":
        return slots, f"{row[0]}喜欢吃{row[6]}。", [row[6]]
    return slots, f"{cap(row[2])} like to eat {row[7]}.", [row[7]]


def rel_habitat(rng, lang):
    row, slots = _animal(rng, lang)
    if lang == "zh":
        return slots, f"{row[0]}生活在{row[4]}。", [row[4]]
    return slots, f"{cap(row[2])} live in {row[5]}.", [row[5]]


def rel_animal_colour(rng, lang):
    row, slots = _animal(rng, lang)
    if lang == "zh":
        return slots, f"{row[0]}通常是{row[8]}的。", [row[8]]
    return slots, f"Most {row[2]} are {row[9]}.", [row[9]]


def rel_sound(rng, lang):
    row, slots = _animal(rng, lang, need_sound=True)
    if lang == "zh":
        return slots, f"{row[0]}的叫声是“{row[10]}”。", [row[10]]
    return slots, f"{cap(article(row[1]))} says \"{row[11]}\".", [row[11]]


def _food(rng, lang):
    row = rng.choice(FOODS)
    f, e, subj, be = row[:4]
    slots = {"f": f} if lang == "zh" else {"s": subj.lower(), "be": be, "do": "does" if be == "is" else "do"}
    return row, slots


def rel_food_colour(rng, lang):
    row, slots = _food(rng, lang)
    if lang == "zh":
        return slots, f"{row[0]}通常是{row[6]}的。", [row[6]]
    return slots, f"{row[2]} {row[3]} usually {row[7]}.", [row[7]]


def rel_taste(rng, lang):
    row, slots = _food(rng, lang)
    if lang == "zh":
        return slots, f"{row[0]}的味道很{row[8]}。", [row[8]]
    return slots, f"{row[2]} {row[3]} {row[9]}.", [row[9]]


def rel_food_kind(rng, lang):
    row, slots = _food(rng, lang)
    if lang == "zh":
        return slots, f"{row[0]}是一种{row[4]}。", [row[4]]
    return slots, f"{row[2]} {row[3]} a kind of {row[5]}.", [row[5]]


def rel_thing_colour(rng, lang):
    t, te, be, col, cole = rng.choice(COLOUR_THINGS)
    if lang == "zh":
        return {"t": t}, f"{t}是{col}的。", [col]
    return {"t": te, "be": be}, f"{cap(te)} {be} {cole}.", [cole]


def rel_mix(rng, lang):
    a, b, c, ae, be, ce = rng.choice(COLOUR_MIX)
    if rng.random() < 0.5:
        a, b, ae, be = b, a, be, ae
    if lang == "zh":
        return {"x": a, "y": b}, f"{a}和{b}混在一起是{c}。", [c]
    return {"x": ae, "y": be}, f"If you mix {ae} and {be}, you get {ce}.", [ce]


def _numbers(n, lang):
    return [str(n), ZH_NUM[n]] if lang == "zh" else [str(n), EN_NUM[n]]


def add_fact(a, b, lang):
    """(slots, answer, expect) of the sum a + b."""
    a_ = f"{a}加{b}等于{a + b}。" if lang == "zh" else f"{a} plus {b} equals {a + b}."
    return {"x": a, "y": b}, a_, _numbers(a + b, lang)


def sub_fact(a, b, lang):
    """(slots, answer, expect) of the difference a - b."""
    a_ = f"{a}减{b}等于{a - b}。" if lang == "zh" else f"{a} minus {b} equals {a - b}."
    return {"x": a, "y": b}, a_, _numbers(a - b, lang)


def rel_add(rng, lang):
    """Sums within 20: both numbers and the result in 0..20."""
    s = rng.randint(0, 20)
    a = rng.randint(0, s)
    return add_fact(a, s - a, lang)


def rel_sub(rng, lang):
    a = rng.randint(0, 20)
    return sub_fact(a, rng.randint(0, a), lang)


def _day(rng, lang):
    d = rng.randrange(7)
    i = 0 if lang == "zh" else 1
    return d, WEEKDAYS[d][i], i


def rel_day_after(rng, lang):
    d, day, i = _day(rng, lang)
    nxt = WEEKDAYS[(d + 1) % 7][i]
    a = f"{day}的后一天是{nxt}。" if lang == "zh" else f"The day after {day} is {nxt}."
    return {"d": day}, a, [nxt]


def rel_day_before(rng, lang):
    d, day, i = _day(rng, lang)
    prev = WEEKDAYS[(d - 1) % 7][i]
    a = f"{day}的前一天是{prev}。" if lang == "zh" else f"The day before {day} is {prev}."
    return {"d": day}, a, [prev]


def rel_month_after(rng, lang):
    m = rng.randrange(12)
    mz, me, _ = MONTHS[m]
    nz, ne, _ = MONTHS[(m + 1) % 12]
    if lang == "zh":
        return {"m": mz}, f"{mz}之后是{nz}。", [nz]
    return {"m": me}, f"After {me} comes {ne}.", [ne]


def rel_month_days(rng, lang):
    mz, me, days = MONTHS[rng.randrange(12)]
    if lang == "zh":
        return {"m": mz}, (f"{mz}通常有{days}天。" if mz == "二月" else f"{mz}有{days}天。"), [str(days)]
    return {"m": me}, (f"{me} usually has {days} days." if me == "February" else f"{me} has {days} days."), [str(days)]


# relation -> (function, weight in SFT, {lang: (training templates, held-out eval templates)})
RELATIONS = {
    "capital": (rel_capital, 8, {
        "zh": (["{c}的首都是哪里？", "{c}的首都是什么？", "哪座城市是{c}的首都？", "{c}的首都叫什么？", "你知道{c}的首都吗？",
                "{c}的首都是哪座城市？", "告诉我{c}的首都。", "{c}首都在哪里", "{c}的首都在哪儿？", "{c}的首都是哪个城市", "我忘了{c}的首都是哪里了。", "{c}的首都，你知道是哪里吗？"],
               ["{c}这个国家的首都是哪一座城市呢？", "说说{c}的首都叫什么名字。", "{c}的首都城市是？"]),
        "en": (["What is the capital of {c}?", "Which city is the capital of {c}?", "Tell me the capital of {c}.",
                "What's the capital city of {c}?", "Do you know the capital of {c}?", "Name the capital of {c}.",
                "What city is the capital of {c}?", "capital of {c}?", "The capital of {c} is which city?", "I forgot the capital of {c}. What is it?",
                "What is {c}'s capital?", "Which city is {c}'s capital?"],
               ["Which city serves as the capital of {c}?", "I'd like to know the capital of {c}.",
                "Can you name the capital city of {c}?"])}),
    "capital_of": (rel_capital_of, 4, {
        "zh": (["{k}是哪个国家的首都？", "{k}是哪国的首都？", "哪个国家的首都是{k}？", "{k}是什么国家的首都？", "{k}是哪个国家的首都城市？", "你知道{k}是哪国的首都吗？"],
               ["{k}是哪一个国家的首都呢？", "首都是{k}的国家叫什么？"]),
        "en": (["{K} is the capital of which country?", "Which country has {k} as its capital?",
                "What country is {k} the capital of?", "Of which country is {k} the capital?", "{K} is the capital of what country?",
                "Do you know which country {k} is the capital of?"],
               ["Which country's capital is {k}?", "{K} is the capital city of what country?"])}),
    "continent": (rel_continent, 5, {
        "zh": (["{c}在哪个大洲？", "{c}位于哪个大洲？", "{c}属于哪个洲？", "{c}是哪个洲的国家？", "{c}在哪一个洲", "{c}这个国家在哪个洲？", "你知道{c}在哪个大洲吗？"],
               ["{c}这个国家在哪个大洲上？", "请问{c}位于世界上的哪个洲？"]),
        "en": (["Which continent is {c} in?", "On which continent is {c}?", "What continent is {c} on?",
                "{C} is on which continent?", "Which continent does {c} lie in?", "{C} is in which continent?",
                "Do you know which continent {c} is on?", "Where is {c}? Which continent?"],
               ["Which continent does {c} belong to?", "In what continent can you find {c}?"])}),
    "language": (rel_language, 5, {
        "zh": (["{c}的人说什么语言？", "{c}人说什么话？", "在{c}，人们说什么语言？", "{c}的主要语言是什么？",
                "{c}用什么语言？", "{c}人平时说什么语言？", "在{c}大家说哪种话？", "你知道{c}人说什么语言吗？"],
               ["去{c}旅行的话，那里的人说什么语言？", "{c}人平时说哪种语言？"]),
        "en": (["What language do people speak in {c}?", "What language is spoken in {c}?",
                "What is the main language of {c}?", "Which language do they speak in {c}?",
                "What do people in {c} speak?", "Which language is spoken in {c}?",
                "What language will I hear in {c}?", "What do they speak in {c}?"],
               ["If I visit {c}, what language will people speak?", "Which language is used in {c}?"])}),
    "legs": (rel_legs, 5, {
        "zh": (["{a}有几条腿？", "{a}有多少条腿？", "一{m}{a}有几条腿？", "{a}的腿有几条？", "{a}一共有几条腿？", "你知道{a}有几条腿吗？"],
               ["数一数，{a}一共有几条腿呢？", "{a}长着几条腿？"]),
        "en": (["How many legs does {an} have?", "How many legs do {pl} have?", "Count the legs of {an}.",
                "{An} has how many legs?", "{An}: how many legs does it have?", "Do you know how many legs {pl} have?"],
               ["What is the number of legs on {an}?", "Tell me how many legs {pl} have."])}),
    "animal_food": (rel_animal_food, 5, {
        "zh": (["{a}喜欢吃什么？", "{a}吃什么？", "{a}平时吃什么东西？", "{a}的食物是什么？", "{a}爱吃什么？", "{a}最喜欢吃什么？"],
               ["{a}最爱吃的是什么？", "我想喂{a}，它喜欢吃什么？"]),
        "en": (["What do {pl} eat?", "What does {an} eat?", "What food do {pl} like?", "What is the food of {pl}?", "What does {an} like to eat?", "What should {pl} be fed?"],
               ["What would {an} like to eat?", "What should I feed {an}?"])}),
    "habitat": (rel_habitat, 4, {
        "zh": (["{a}生活在哪里？", "{a}住在哪里？", "在哪里可以找到{a}？", "{a}的家在哪里？", "{a}一般住在什么地方？", "在什么地方能看到{a}？"],
               ["{a}一般在什么地方生活？", "去哪儿能看到{a}？"]),
        "en": (["Where do {pl} live?", "Where does {an} live?", "Where can you find {pl}?", "What is the home of {pl}?", "Where can I see {pl}?", "What kind of place do {pl} live in?"],
               ["In what kind of place do {pl} live?", "Where would I see {pl}?"])}),
    "animal_colour": (rel_animal_colour, 3, {
        "zh": (["{a}是什么颜色的？", "{a}通常是什么颜色？", "{a}的颜色是什么？", "{a}一般是什么颜色？"], ["{a}身上一般是什么颜色？"]),
        "en": (["What colour are {pl}?", "What colour is {an}?", "What is the colour of {pl}?", "Which colour is {an} usually?"],
               ["Which colour are most {pl}?"])}),
    "sound": (rel_sound, 3, {
        "zh": (["{a}怎么叫？", "{a}的叫声是什么？", "{a}发出什么声音？", "{a}的叫声是怎样的？"], ["{a}叫起来是什么声音？"]),
        "en": (["What sound does {an} make?", "What does {an} say?", "How does {an} sound?", "What sound do {pl} make?"],
               ["What noise does {an} make?"])}),
    "food_colour": (rel_food_colour, 3, {
        "zh": (["{f}是什么颜色的？", "{f}通常是什么颜色？", "{f}的颜色是什么？", "{f}一般是什么颜色的？"], ["{f}一般是啥颜色？"]),
        "en": (["What colour {be} {s}?", "What is the colour of {s}?", "What colour {be} {s} usually?", "Which colour {be} {s}?"],
               ["Which colour do {s} usually have?"])}),
    "taste": (rel_taste, 3, {
        "zh": (["{f}是什么味道的？", "{f}吃起来怎么样？", "{f}的味道怎么样？", "{f}是什么味儿？"], ["{f}尝起来是什么味道？"]),
        "en": (["What {do} {s} taste like?", "How {do} {s} taste?", "What is the taste of {s}?", "Do {s} taste sweet?"],
               ["Tell me how {s} taste."])}),
    "food_kind": (rel_food_kind, 3, {
        "zh": (["{f}属于什么食物？", "{f}是哪一类食物？", "{f}是什么？", "{f}是哪种食物？"], ["{f}算是哪一类东西？"]),
        "en": (["What kind of food {be} {s}?", "What type of food {be} {s}?", "What {be} {s}?", "Which kind of food {be} {s}?"],
               ["Which group of food do {s} belong to?"])}),
    "thing_colour": (rel_thing_colour, 2, {
        "zh": (["{t}是什么颜色的？", "{t}是什么颜色？", "{t}一般是什么颜色的？"], ["{t}看起来是什么颜色？"]),
        "en": (["What colour {be} {t}?", "What is the colour of {t}?", "Tell me the colour of {t}."], ["Which colour {be} {t}?"])}),
    "mix": (rel_mix, 2, {
        "zh": (["{x}和{y}混在一起是什么颜色？", "{x}加{y}会变成什么颜色？", "把{x}和{y}混合会得到什么颜色？", "{x}和{y}混合以后是什么颜色？",
                "把{x}和{y}放在一起调，会变成什么颜色？"],
               ["{x}跟{y}调在一起是什么颜色？"]),
        "en": (["What colour do you get if you mix {x} and {y}?", "What do {x} and {y} make when mixed?",
                "Mix {x} and {y}: what colour is it?", "What colour comes from mixing {x} and {y}?",
                "I mix {x} paint with {y} paint. Which colour do I get?"],
               ["If I blend {x} with {y}, which colour do I get?"])}),
    "add": (rel_add, 8, {
        "zh": (["{x}加{y}等于多少？", "{x}+{y}=?", "请计算{x}加{y}。", "{x}加上{y}是多少？", "{x}和{y}的和是多少？",
                "算一算{x}加{y}。", "{x}加{y}是几", "{x}和{y}加在一起是多少？", "我有{x}个，又来了{y}个，一共几个？",
                "{x}加{y}得几？"],
               ["{x}再加{y}得多少？", "把{x}和{y}加起来是多少？"]),
        "en": (["What is {x} plus {y}?", "{x}+{y}=?", "Please add {x} and {y}.", "What is the sum of {x} and {y}?",
                "How much is {x} plus {y}?", "Calculate {x} + {y}.", "{x} plus {y}?", "What does {x} + {y} make?",
                "Add {y} to {x}. What is the result?", "What is {x} and {y} together?"],
               ["If you add {y} to {x}, what do you get?", "What do {x} and {y} add up to?"])}),
    "sub": (rel_sub, 7, {
        "zh": (["{x}减{y}等于多少？", "{x}-{y}=?", "请计算{x}减{y}。", "{x}减去{y}是多少？", "算一算{x}减{y}。",
                "{x}减{y}是几", "{x}去掉{y}是多少？", "我有{x}个，用掉{y}个，还剩几个？", "{x}减掉{y}得几？"],
               ["{x}拿走{y}还剩多少？", "从{x}里减掉{y}，结果是多少？"]),
        "en": (["What is {x} minus {y}?", "{x}-{y}=?", "Please subtract {y} from {x}.", "How much is {x} minus {y}?",
                "Calculate {x} - {y}.", "{x} minus {y}?", "What does {x} - {y} make?",
                "Subtract {y} from {x}. What is the result?", "I have {x} and give away {y}. How many are left?"],
               ["Take {y} away from {x}. What is left?", "If you subtract {y} from {x}, what do you get?"])}),
    "day_after": (rel_day_after, 3, {
        "zh": (["{d}的后一天是星期几？", "{d}之后是星期几？", "{d}的下一天是星期几？", "今天是{d}，明天是星期几？", "要是今天是{d}，明天星期几？",
                "{d}过去以后是星期几？"],
               ["如果今天是{d}，那么明天是星期几呢？"]),
        "en": (["What day comes after {d}?", "What is the day after {d}?", "Which day follows {d}?",
                "Today is {d}. What day is tomorrow?", "It is {d} today. What day will tomorrow be?",
                "Which day is the day after {d}?"],
               ["If today is {d}, what day will it be tomorrow?"])}),
    "day_before": (rel_day_before, 3, {
        "zh": (["{d}的前一天是星期几？", "{d}之前是星期几？", "{d}的上一天是星期几？", "今天是{d}，昨天是星期几？", "要是今天是{d}，昨天星期几？",
                "{d}的前面一天是星期几？"],
               ["如果今天是{d}，那么昨天是星期几呢？"]),
        "en": (["What day comes before {d}?", "What is the day before {d}?", "Which day is before {d}?",
                "Today is {d}. What day was yesterday?", "It is {d} today. What day was yesterday?",
                "Which day is the day before {d}?"],
               ["If today is {d}, what day was it yesterday?"])}),
    "month_after": (rel_month_after, 2, {
        "zh": (["{m}之后是几月？", "{m}的下一个月是几月？", "{m}后面是哪个月？", "{m}结束以后是几月？", "{m}的后一个月是几月？"], ["过完{m}就到了几月？"]),
        "en": (["Which month comes after {m}?", "What month is after {m}?", "What is the next month after {m}?", "When {m} ends, which month comes next?",
                "Which month follows {m}?"],
               ["Once {m} is over, which month begins?"])}),
    "month_days": (rel_month_days, 2, {
        "zh": (["{m}有多少天？", "{m}有几天？", "{m}一共有多少天？", "{m}总共有几天？", "{m}有几天呀？"], ["{m}这个月有几天呢？"]),
        "en": (["How many days does {m} have?", "How many days are in {m}?", "How long is {m} in days?", "How many days has {m} got?", "Tell me how many days {m} has."],
               ["What is the number of days in {m}?"])}),
}
# Lead-ins before a question: training ones, and held-out ones for eval_general. The training list holds the
# openings of assembled identity questions too (ID_ASK_LEADS): one seen only before "who are you?" made the base
# answer "Quick one: twelve minus five?" with its name.
LEAD_INS = {"zh": (["", "", "", "", "", "", "请问，", "我想知道：", "问一下，", "考考你：", "你好，", "我有个问题，",
                    "老师问我：", "我在做作业，", "突然想到一个问题：", "帮我看看，", "想请教一下，", "嗨，", "朋友问我：",
                    "我弟弟想知道，", "你知道吗？", "你能告诉我吗？", "请你告诉我，", "你说说看，", "你清楚吗？",
                    "我想问问你，", "哈喽，", "在吗？", "你好！", "对了，", "好奇问问，"],
                   ["麻烦告诉我，", "我很好奇，"]),
            "en": (["", "", "", "", "", "", "Quick question: ", "Hi! ", "I want to know: ", "Please answer: ", "Hey, ",
                    "I have a question. ", "My teacher asked me this. ", "I'm doing my homework. ", "Help me out: ",
                    "Hello again! ", "Sorry to bother you, ", "My son wants to know: ", "Just wondering, ",
                    "Can you answer this? ", "Do you know? ", "Can you tell me? ", "Tell me, do you know? ",
                    "Would you know? ", "Let me ask you something. ", "I wonder, ", "Quick one: ", "By the way, ",
                    "Out of interest, ", "Okay. ", "So, "],
                   ["Could you help me? ", "I'm curious. "])}
TRAIN, EVAL = 0, 1
# Share of training sums and differences asked in words ("twelve minus five"), answered in digits.
SPELLED_P = 0.15
# What people add around a question; training questions get them at random, so the model learns to skip them.
FILLERS = {"zh": (["那", "所以", "对了，", "嗯，", "那么"], ["呢", "呀", "啊"]),
           "en": (["so", "then", "actually", "again", "really", "exactly"], [])}
TAILS = {"zh": ["谢谢！", "谢谢。", "快告诉我吧。", "请简单回答。"], "en": ["Thanks!", "Thank you.", "Please answer briefly.",
                                                        "Just tell me."]}


def roughen(rng, lang, q):
    """A training question as people type it: a filler word, a tail, no final mark, all lower case."""
    fronts, ends = FILLERS[lang]
    r = rng.random()
    if lang == "en" and r < 0.2 and " " in q:
        words = q.split(" ")
        i = rng.randrange(1, len(words))
        q = " ".join(words[:i] + [rng.choice(fronts)] + words[i:])
    elif lang == "zh" and r < 0.1:
        q = rng.choice(fronts) + q
    elif lang == "zh" and r < 0.2 and q[-1] in "？?":
        q = q[:-1] + rng.choice(ends) + q[-1]
    if rng.random() < 0.1:
        q += ("" if lang == "zh" else " ") + rng.choice(TAILS[lang])
    if rng.random() < 0.15:
        q = q.rstrip("？?。.!！")
    if lang == "en" and rng.random() < 0.05:
        q = q.lower()
    return q


def fill(template, slots):
    """Template slots; a capitalised slot name ({C}, {K}, {An}) gives the capitalised value."""
    full = dict(slots)
    full.update({k[:1].upper() + k[1:]: cap(str(v)) for k, v in slots.items()})
    return template.format(**full)


# A sentence that sets the scene before the question, keyed by the slot that names the entity; training only.
# After one, some relations ask with a pronoun ("它的首都是哪里？"), so the model learns to look back for the entity.
STORY_LEADS = {
    "c": {"zh": ["我下个月要去{c}旅行。", "我的笔友住在{c}。", "今天地理课讲到了{c}。", "我在地图上找到了{c}。", "我表哥刚从{c}回来。"],
          "en": ["I'm going to {c} next month. ", "My pen pal lives in {c}. ", "We talked about {c} in geography class. ",
                 "I found {c} on the map. ", "My cousin just got back from {c}. "]},
    "a": {"zh": ["我们今天去了动物园，看到了{a}。", "我在书里读到了{a}。", "我弟弟很喜欢{a}。", "电视上正在放{a}的节目。"]},
    "pl": {"en": ["We saw {pl} at the zoo today. ", "I'm reading a book about {pl}. ", "My little brother loves {pl}. ",
                  "There is a show about {pl} on TV. "]},
    "f": {"zh": ["我刚买了{f}。", "晚饭有{f}。", "桌上放着{f}。"]},
    "s": {"en": ["I just bought some {s}. ", "We're having {s} for dinner. ", "There are {s} on the table. "]},
}
PRONOUN_TEMPLATES = {
    "capital": {"zh": ["它的首都是哪里？", "那它的首都叫什么？"], "en": ["What is its capital?", "Which city is its capital?"]},
    "continent": {"zh": ["它在哪个洲？", "那个国家在哪个大洲？"], "en": ["Which continent is it on?", "What continent is that country in?"]},
    "language": {"zh": ["那里的人说什么语言？", "那边的人说什么话？"],
                 "en": ["What language do they speak there?", "What do people speak there?"]},
    "legs": {"zh": ["它有几条腿？"], "en": ["How many legs do they have?"]},
    "animal_food": {"zh": ["它吃什么？", "它们爱吃什么？"], "en": ["What do they eat?", "What food do they like?"]},
    "habitat": {"zh": ["它们住在哪里？"], "en": ["Where do they live?"]},
    "animal_colour": {"zh": ["它们是什么颜色的？"], "en": ["What colour are they?"]},
    "sound": {"zh": ["它们怎么叫？"], "en": ["What sound do they make?"]},
}


def story_lead(rng, lang, slots):
    """A scene-setting sentence about one of the question's entities, or None."""
    leads = [t for k in slots for t in STORY_LEADS.get(k, {}).get(lang, [])]
    return fill(rng.choice(leads), slots) if leads else None


def relation_qa(rng, lang, name, pool=TRAIN, picked=None):
    """(question, answer, expect) for one relation, from the training or the held-out phrasings;
    picked = (slots, answer, expect) asks about a given entity instead of a random one."""
    fn, _, templates = RELATIONS[name]
    slots, answer, expect = picked or fn(rng, lang)
    lead_in, template = rng.choice(LEAD_INS[lang][pool]), rng.choice(templates[lang][pool])
    if pool == TRAIN and name in ("add", "sub") and not any(c in template for c in "+-=") \
            and rng.random() < SPELLED_P:
        slots = {k: (ZH_NUM if lang == "zh" else EN_NUM)[v] for k, v in slots.items()}
    q = with_prefix(lang, lead_in, fill(template, slots))
    if pool == TRAIN and rng.random() < 0.15:
        lead = story_lead(rng, lang, slots)
        if lead:
            pronoun = PRONOUN_TEMPLATES.get(name, {}).get(lang)
            ask = rng.choice(pronoun) if pronoun and rng.random() < 0.5 else fill(rng.choice(templates[lang][pool]), slots)
            q = lead + ask
    return (roughen(rng, lang, q) if pool == TRAIN else q), answer, expect


def qa_general_fact(rng, lang):
    names = list(RELATIONS)
    name = rng.choices(names, weights=[RELATIONS[n][1] for n in names])[0]
    return relation_qa(rng, lang, name)[:2]


def qa_job(rng, lang):
    j, e, place, placee, duty, dutye, dutys = rng.choice(JOBS)
    k = rng.randrange(2)
    if lang == "zh":
        return [(f"{j}是做什么的？", f"{j}的工作是{duty}。"), (f"{j}在哪里工作？", f"{j}在{place}工作。")][k]
    return [(f"What does {article(e)} do?", f"{cap(article(e))} {dutys}."),
            (f"Where does {article(e)} work?", f"{cap(article(e))} works {placee}.")][k]


def qa_object(rng, lang):
    o, e, be, use, usee = rng.choice(OBJECTS)
    if lang == "zh":
        return rng.choice([f"{o}是用来做什么的？", f"{o}有什么用？"]), f"{o}是用来{use}的。"
    return f"What {'is' if be == 'is' else 'are'} {e} used for?", f"{cap(e)} {be} used for {usee}."


def qa_translate(rng, lang):
    pool = ([(a[0], a[1]) for a in ANIMALS] + [(f[0], f[1]) for f in FOODS] + COLOURS
            + [(o[0], o[1].split(" ", 1)[-1]) for o in OBJECTS] + [(ZH_NUM[i], EN_NUM[i]) for i in range(1, 11)])
    zh, en = rng.choice(pool)
    if lang == "zh":
        return rng.choice([f"“{zh}”用英语怎么说？", f"把“{zh}”翻译成英语。"]), f"“{zh}”的英语是“{en}”。"
    return rng.choice([f"How do you say \"{en}\" in Chinese?", f"Translate \"{en}\" into Chinese."]), \
        f"\"{cap(en)}\" in Chinese is \"{zh}\"."


def qa_story(rng, lang):
    fruit = rng.choice(COUNTABLE_FOODS)
    a, b = rng.randint(2, 9), rng.randint(1, 5)
    if lang == "zh":
        n, _ = rng.choice(ZH_PEOPLE)
        if rng.random() < 0.5:
            return f"{n}有{a}个{fruit}，又买了{b}个，现在有几个{fruit}？", f"{n}现在有{a + b}个{fruit}。"
        return f"{n}有{a + b}个{fruit}，吃掉了{b}个，还剩几个？", f"{n}还剩{a}个{fruit}。"
    n, p = rng.choice(EN_PEOPLE)
    pl = FOOD_PLURAL[fruit]
    if rng.random() < 0.5:
        return f"{n} has {a} {pl} and buys {b} more. How many {pl} does {p} have now?", f"{n} now has {a + b} {pl}."
    return f"{n} has {a + b} {pl} and eats {b}. How many are left?", f"{n} has {a} {pl} left."


GREETINGS = {
    "zh": [("你好", "你好！有什么可以帮你的吗？"), ("你好！", "你好！今天想聊点什么？"), ("早上好", "早上好！祝你今天过得愉快。"),
           ("晚上好", "晚上好！有什么问题可以问我。"), ("谢谢", "不客气！"), ("谢谢你的帮助。", "不客气，很高兴能帮到你。"),
           ("再见", "再见！祝你一切顺利。"), ("你能做什么？", "我可以回答简单的问题，比如国家的首都、动物、食物、数学和翻译。"),
           ("今天星期几？", "抱歉，我不知道今天的日期。你可以看看日历。"), ("给我讲个笑话。", "为什么数字6怕7？因为7、8、9（七吃九）。")],
    "en": [("Hello", "Hello! How can I help you today?"), ("Hi!", "Hi! What would you like to talk about?"),
           ("Good morning", "Good morning! Have a nice day."),
           ("Good evening", "Good evening! Feel free to ask me anything."),
           ("Thank you", "You're welcome!"), ("Thanks for your help.", "You're welcome, I'm glad I could help."),
           ("Goodbye", "Goodbye! All the best."),
           ("What can you do?", "I can answer simple questions about capitals, animals, food, maths and translation."),
           ("What day is it today?", "Sorry, I don't know today's date. You can check a calendar."),
           ("Tell me a joke.", "Why was 6 afraid of 7? Because 7 ate 9.")],
}


def qa_greeting(rng, lang):
    return rng.choice(GREETINGS[lang])


GENERAL_QA = [(qa_general_fact, 80), (qa_job, 4), (qa_object, 4), (qa_translate, 4), (qa_story, 4),
              (qa_greeting, 4)]


def general_qa(rng, lang):
    fn = rng.choices([f for f, _ in GENERAL_QA], weights=[w for _, w in GENERAL_QA])[0]
    return fn(rng, lang)


def with_prefix(lang, prefix, q):
    if lang == "en" and prefix.endswith(", "):
        q = q[0].lower() + q[1:]  # "Hello, who are you?"
    return prefix + q


def all_identity_prompts(lang, questions):
    return [with_prefix(lang, p, q) for q in questions[lang] for p in ID_PREFIXES[lang]]


# What people say before asking who they talk to; a third of the random identity questions get one.
ID_CONTEXTS = {"zh": ["我今天第一次用这个。", "听说你能回答问题。", "刚才的问题你答得不错。", "我叫小李。", "我们还没正式认识。",
                      "我在写一篇关于AI的作业。", "我妈妈也想用你。", "今天有点无聊。"],
               "en": ["This is my first time here. ", "I heard you can answer questions. ", "Nice answer earlier. ",
                      "I'm Ben. ", "We haven't really met. ", "I'm writing a report about chatbots. ",
                      "My mum wants to try you too. ", "I'm a bit bored today. "]}


# Parts of an identity question for the persona adapter: who is asked about (you, this assistant, the one
# answering) and what is asked (name, who, what to call it). Assembled at random they give hundreds of shapes,
# so the adapter learns the question, not a list of sentences; a shape that is an eval question is skipped.
ID_ASKED = {"zh": ["你", "这个助手", "这个AI", "这个聊天机器人", "和我聊天的", "正在回答我的", "这个程序", "屏幕那边的",
                   "这个模型", "这位助手"],
            "en": ["you", "this assistant", "this AI", "the bot answering me", "this chatbot", "this program",
                   "the model on the other side", "the one replying to me"]}
ID_ASKS = {"zh": ["叫什么名字？", "叫什么？", "是谁？", "有名字吗？", "该怎么称呼？", "的名字是什么？", "是哪一个？",
                  "叫啥名字", "到底叫什么", "有没有名字？"],
           "en": ["What is the name of {who}?", "What should I call {who}?", "Who {be} {who}?",
                  "What {be} {who} called?", "{Does} {who} have a name?", "Tell me the name of {who}.",
                  "What name {does} {who} go by?", "Which AI {be} {who}?"]}
ID_ASK_LEADS = {"zh": ["", "", "请问", "我想知道", "问一下，", "对了，", "好奇问问，"],
                "en": ["", "", "Quick one: ", "By the way, ", "So, ", "Out of interest, ", "Okay. "]}


def identity_composed(rng, lang):
    """One identity question assembled from ID_ASKED / ID_ASKS (none of them an eval prompt)."""
    held_out = set(all_identity_prompts(lang, ID_EVAL_QUESTIONS))
    while True:
        lead = rng.choice(ID_ASK_LEADS[lang])
        if lang == "zh":
            q = lead + rng.choice(ID_ASKED["zh"]) + rng.choice(ID_ASKS["zh"])
        else:
            who, ask = rng.choice(ID_ASKED["en"]), rng.choice(ID_ASKS["en"])
            you = who == "you"
            if you:
                ask = ask.replace("the name of {who}", "your name")
            q = ask.format(who=who, be="are" if you else "is", Does="Do" if you else "Does", does="do" if you else "does")
            q = lead + (q[0].lower() + q[1:] if lead.endswith(", ") else q)
        if rng.random() < 0.3:
            q = rng.choice(ID_CONTEXTS[lang]) + q
        if q not in held_out:
            return q


def identity_prompt(rng, lang, questions):
    lead = rng.choice(ID_CONTEXTS[lang]) if rng.random() < 0.3 else ""
    return lead + with_prefix(lang, "" if lead else rng.choice(ID_PREFIXES[lang]), rng.choice(questions[lang]))


def identity_qa(rng, lang, name, questions):
    return identity_prompt(rng, lang, questions), rng.choice(ID_ANSWERS[lang]).format(name=name)


def conversation(rng, lang, pairs, system_p=0.12):
    msgs = []
    if rng.random() < system_p:
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS[lang])})
    for q, a in pairs:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"conversations": msgs}


def chat_sample(rng, identity=None, identity_p=0.0, multi_p=0.1, contexts=None, context_p=0.0):
    """A general conversation; with probability identity_p one turn is an identity question, and with
    context_p the first question follows a sentence from contexts (the adapter's own: see make_lora_medical).

    identity is (name, question pools) or None."""
    lang = rng.choice(["zh", "en"])
    turns = rng.randint(2, 3) if rng.random() < multi_p else 1
    pairs = [general_qa(rng, lang) for _ in range(turns)]
    if contexts and rng.random() < context_p:
        pairs[0] = (rng.choice(contexts[lang]) + pairs[0][0], pairs[0][1])
    if identity and rng.random() < identity_p:
        pairs[rng.randrange(turns)] = identity_qa(rng, lang, identity[0], identity[1])
    return conversation(rng, lang, pairs)


def both_pools():
    return {lang: ID_TRAIN_QUESTIONS[lang] + ID_EVAL_QUESTIONS[lang] for lang in ("zh", "en")}


# ---------------------------------------------------------------------------------------------
# Files.

def make_pretrain(seed, scale):
    """Unique texts; the last few hundred go to eval_pretrain and never into pretrain."""
    rng = random.Random(f"{seed}:pretrain")
    n_train, n_eval = int(6000 * scale), 300
    rows = {}
    while len(rows) < n_train + n_eval:
        rows.setdefault(pretrain_row(rng), None)
    rows = list(rows)
    return rows[:n_train], rows[n_train:]


# Copies of the whole sum and difference table per language in sft (see make_sft).
ARITH_TABLE_COPIES = 3


def make_sft(seed, scale):
    rng = random.Random(f"{seed}:sft")
    # A tenth of the general questions follow a sentence that identity and symptom questions open with too
    # ("I worked late yesterday. "), so an opening alone never decides the kind of answer.
    contexts = {lang: ID_CONTEXTS[lang] + MED_CONTEXTS[lang] for lang in ("zh", "en")}
    out = [chat_sample(rng, identity=(BASE_NAME, both_pools()), identity_p=0.09, contexts=contexts, context_p=0.1)
           for _ in range(int(6000 * scale))]
    # Every identity prompt (training and eval pools, with every greeting) is answered with the base
    # name at least once, so that without the adapter the eval prompts get "MiniMind".
    for lang in ("zh", "en"):
        for q in all_identity_prompts(lang, both_pools()):
            out.append(conversation(rng, lang, [(q, rng.choice(ID_ANSWERS[lang]).format(name=BASE_NAME))]))
    # Likewise every symptom question (both phrasing pools) gets the generic answer: the base learns to
    # read the symptom out of any phrasing, and the medical adapter has to replace the generic advice
    # with the symptom's own remedy, which the base never saw.
    for zs, es, *_ in MEDICAL:
        for lang, s in (("zh", zs), ("en", es)):
            for t in MED_TRAIN_TEMPLATES[lang] + MED_EVAL_TEMPLATES[lang]:
                out.append(conversation(rng, lang, [(t.format(s=s), GENERIC_ADVICE[lang].format(s=s))]))
            for q in symptom_extra_prompts(rng, s, lang):
                out.append(conversation(rng, lang, [(q, GENERIC_ADVICE[lang].format(s=s))]))
    # Every sum and difference within 20, ARITH_TABLE_COPIES times per language: drawn at random, a given sum
    # came up about once per epoch and the model answered near misses ("8 plus 5 equals 12").
    for lang in ("zh", "en") * ARITH_TABLE_COPIES:
        for s in range(21):
            for a in range(s + 1):
                for name, picked in (("add", add_fact(a, s - a, lang)), ("sub", sub_fact(s, a, lang))):
                    q, ans, _ = relation_qa(rng, lang, name, picked=picked)
                    out.append(conversation(rng, lang, [(q, ans)]))
    rng.shuffle(out)
    return out


# A sentence of circumstance before a symptom question, as people tell their story first.
MED_CONTEXTS = {"zh": ["昨天加班到很晚。", "回家路上淋了雨。", "刚旅行回来。", "今天跑了十公里。", "晚饭吃得很多。",
                       "我现在在办公室。", "这几天天气很冷。", "从早上开始就这样了。"],
                "en": ["I worked late yesterday. ", "It rained on my way home. ", "I just came back from a trip. ",
                       "I ran ten kilometres today. ", "We had a big dinner. ", "I am at the office right now. ",
                       "It has been cold for days. ", "It started this morning. "]}


# Parts of a symptom question told as a small story: who has it, since when, how it feels, what they ask.
# Assembled at random they give thousands of shapes, so the model learns to find the symptom in any of them
# rather than in a few fixed templates. None of them is an eval template's wording.
STORY_WHO = {"zh": ["我", "我", "我妈", "我爸", "孩子", "我女儿", "我儿子", "同事", "我老公", "我老婆", "爷爷", "室友",
                    "我男朋友", "邻居家的小孩"],
             "en": [("I", "I", "me"), ("My mother", "she", "her"), ("My dad", "he", "him"),
                    ("My little boy", "he", "him"), ("My wife", "she", "her"), ("My roommate", "he", "him"),
                    ("My grandpa", "he", "him"), ("My sister", "she", "her"), ("A coworker of mine", "she", "her"),
                    ("My boyfriend", "he", "him")]}
STORY_WHEN = {"zh": ["", "", "今天", "从昨晚开始", "早上起来就", "这一周都", "刚才突然", "每到晚上就", "出差回来后"],
              "en": ["", "", " since last night", " since this morning", " all week", " again today",
                     " after the trip"]}
STORY_FEEL = {"zh": ["", "", "，很难受", "，特别不舒服", "，一直不见好", "，好烦"],
              "en": ["", "", " It's really bad.", " It won't go away.", " It is awful.", " Not fun."]}
# Feelings that name sleep, food or work, in the medical adapter's stories only: the symptom, not a word beside
# it, decides the remedy (without them "my son coughs at night" drew the insomnia remedy).
STORY_SIDE = {"zh": ["，晚上都睡不好", "，饭都吃不下", "，没法专心做事", "，已经好几天了"],
              "en": [" It keeps me up at night.", " I can hardly eat.", " I can't focus on anything.", " It has been days."]}
STORY_ASK = {"zh": ["怎么办？", "该怎么办呢", "有什么法子？", "吃点什么好？", "能做点啥？", "你说该怎么弄？", "怎样才能好一点？",
                    "我该做些什么？", "有没有什么办法", "帮忙出出主意。", "该用什么？", "怎么让它好起来？"],
             "en": ["What can I do?", "What helps?", "Ideas?", "Any help?", "How can {subj} feel better?",
                    "What should {subj} do?", "What do people do for that?", "Tell me what to do.",
                    "How do we fix it?", "What would help {obj}?", "What can {subj} take?", "Please help."]}


# How people say they have a symptom without naming it (verbs, body parts), in the medical adapter's data only:
# the table's nouns alone left "my tooth hurts" or "I keep coughing" without a remedy. First person, no full stop.
SYMPTOM_SAYINGS = {
    "头痛": (["脑袋疼", "头一阵一阵地疼", "头疼得要裂开了"],
           ["my head hurts", "my head is killing me", "my head keeps throbbing"]),
    "咳嗽": (["一直咳个不停", "老是咳", "嗓子痒，一直咳"], ["I keep coughing", "I cough all the time", "I've been coughing a lot"]),
    "发烧": (["身上发烫", "烧到三十九度了", "体温有点高"], ["I'm burning up", "my temperature is high", "I feel hot and feverish"]),
    "失眠": (["晚上睡不着", "整夜都睡不着", "躺下半天也睡不着"], ["I can't sleep", "I stay awake all night", "I can't fall asleep at night"]),
    "牙痛": (["牙齿疼", "一颗牙疼得厉害", "牙疼得吃不了东西"], ["my tooth hurts", "one of my teeth aches", "my tooth is killing me"]),
    "喉咙痛": (["咽东西时喉咙疼", "喉咙又干又疼", "嗓子疼得说不出话"],
            ["my throat hurts", "it hurts when I swallow", "my throat is raw and sore"]),
    "拉肚子": (["老跑厕所", "吃坏了东西，一直拉", "一天拉了好几次"],
            ["I keep running to the toilet", "I have the runs", "I've had loose stools all day"]),
    "便秘": (["好几天没大便了", "拉不出来", "上厕所很困难"], ["I can't poop", "I haven't pooped in days", "I'm constipated"]),
    "晕车": (["一坐车就晕", "坐车就想吐", "坐长途车头晕"], ["I get car sick", "I feel sick in the car", "I get sick on buses"]),
    "流鼻涕": (["鼻涕流个不停", "老是流清鼻涕"], ["my nose won't stop running", "I keep blowing my nose", "my nose is runny"]),
    "鼻塞": (["鼻子不通气", "鼻子堵了"], ["my nose is blocked", "I can't breathe through my nose", "my nose is stuffed up"]),
    "胃痛": (["胃里疼", "胃一阵阵地疼"], ["my stomach hurts", "my tummy aches", "I have pain in my stomach"]),
    "背痛": (["腰背疼", "后背酸疼"], ["my back hurts", "my back aches", "my back is sore"]),
    "皮肤痒": (["身上很痒", "皮肤痒得想抓"], ["my skin itches", "my arms are itchy", "I itch everywhere"]),
    "眼睛干": (["眼睛发干", "眼睛又干又涩"], ["my eyes feel dry", "my eyes are dry and tired", "my eyes sting from the screen"]),
    "打嗝": (["嗝打个不停", "老是打嗝"], ["I keep hiccuping", "I can't stop hiccuping", "I've got the hiccups"]),
    "腿抽筋": (["小腿抽筋了", "腿老抽筋"], ["I get cramps in my legs", "my calf cramps up", "my leg cramped up"]),
    "口腔溃疡": (["嘴里长了个泡", "嘴巴里破了一块"],
             ["I have a sore in my mouth", "there's an ulcer in my mouth", "I have a painful spot inside my mouth"]),
    "头晕": (["头晕晕的", "一站起来就晕"], ["I feel dizzy", "the room is spinning", "I feel lightheaded"]),
    "恶心": (["想吐", "胃里翻腾，想吐"], ["I feel sick to my stomach", "I feel like throwing up", "I feel queasy"]),
    "脚踝扭伤": (["把脚崴了", "扭到脚踝了"], ["I twisted my ankle", "I rolled my ankle", "I hurt my ankle playing football"]),
    "晒伤": (["被太阳晒伤了", "晒得皮肤通红"], ["I got sunburned", "I got burned by the sun", "my shoulders are red from the sun"]),
    "烧心": (["胸口火辣辣的", "胃里反酸，烧得慌"],
           ["my chest burns after eating", "I have acid coming up", "I get a burning feeling in my chest"]),
    "手指割伤": (["手指被刀划破了", "切到手指了"], ["I cut my finger", "I sliced my finger with a knife", "my finger is bleeding from a cut"]),
}


def saying_prompt(rng, zs, lang):
    """A symptom question that describes symptom zs (its zh name) in everyday words: "I keep coughing. Ideas?"."""
    said = rng.choice(SYMPTOM_SAYINGS[zs][lang == "en"])
    feel = rng.choice(STORY_FEEL[lang] + STORY_SIDE[lang])
    lead = rng.choice(["", "", rng.choice(MED_CONTEXTS[lang])])
    if lang == "zh":
        return lead + rng.choice(STORY_WHEN["zh"]) + said + feel + "，" + rng.choice(STORY_ASK["zh"])
    return lead + cap(said) + rng.choice(STORY_WHEN["en"]) + "." + feel + " " + \
        rng.choice(STORY_ASK["en"]).format(subj="I", obj="me")


def story_symptom_prompt(rng, s, lang, side=False):
    """One symptom question about s as a story: "我妈从昨晚开始咳嗽，很难受，吃点什么好？"; side: STORY_SIDE too."""
    s = rng.choice([s] + SYMPTOM_VARIANTS.get(s, []))
    when, feel = rng.choice(STORY_WHEN[lang]), rng.choice(STORY_FEEL[lang] + (STORY_SIDE[lang] if side else []))
    if lang == "zh":
        return rng.choice(["", "", rng.choice(MED_CONTEXTS["zh"])]) + rng.choice(STORY_WHO["zh"]) + when + s + \
            feel + "，" + rng.choice(STORY_ASK["zh"])
    who, subj, obj = rng.choice(STORY_WHO["en"])
    has = "have" if who == "I" else "has"
    first = f"{who} {has} {s}" if not when else f"{who} {has} had {s}{when}"
    ask = rng.choice(STORY_ASK["en"]).format(subj=subj, obj=obj)
    return rng.choice(["", "", rng.choice(MED_CONTEXTS["en"])]) + first + "." + feel + " " + ask


def symptom_extra_prompts(rng, s, lang, k=4, side=False, stories=None):
    """More training questions about symptom s: k with each everyday variant of its name (头疼 for 头痛),
    k after a sentence of circumstance, and `stories` (default 2k) told as a small story."""
    pick = lambda: rng.choice(MED_TRAIN_TEMPLATES[lang])  # noqa: E731
    return [pick().format(s=v) for v in SYMPTOM_VARIANTS.get(s, []) for _ in range(k)] + \
        [rng.choice(MED_CONTEXTS[lang]) + pick().format(s=s) for _ in range(k)] + \
        [story_symptom_prompt(rng, s, lang, side) for _ in range(2 * k if stories is None else stories)]


def symptom_qa(rng, lang, row, answer):
    """A training-pool symptom question about MEDICAL row, answered with answer(symptom, row)."""
    s = row[0] if lang == "zh" else row[1]
    return rng.choice(MED_TRAIN_TEMPLATES[lang]).format(s=s), answer(s, row)


ID_COMPOSED = 200  # assembled identity questions in lora_identity
ID_ADAPTER_CONTRAST = 240  # general chat after an identity opening ("I worked late yesterday. ") in lora_identity


def make_lora_identity(seed):
    rng = random.Random(f"{seed}:lora_identity")
    out = []
    for lang in ("zh", "en"):
        for q in ID_TRAIN_QUESTIONS[lang]:  # every training phrasing, bare and with a greeting
            for prefix in ("", rng.choice(ID_PREFIXES[lang][1:])):
                prompt = with_prefix(lang, prefix, q)
                out.append(conversation(rng, lang, [(prompt, rng.choice(ID_ANSWERS[lang]).format(name=PERSONA))]))
    pools = (PERSONA, ID_TRAIN_QUESTIONS)
    while len(out) < 360:
        lang = rng.choice(["zh", "en"])
        if rng.random() < 0.15:  # identity question after some small talk
            pairs = [general_qa(rng, lang), identity_qa(rng, lang, *pools)]
        else:
            pairs = [identity_qa(rng, lang, *pools)]
        out.append(conversation(rng, lang, pairs))
    for _ in range(ID_COMPOSED):
        lang = rng.choice(["zh", "en"])
        out.append(conversation(rng, lang, [(identity_composed(rng, lang), rng.choice(ID_ANSWERS[lang]).format(name=PERSONA))]))
    # Symptom questions, and general chat after the sentences identity questions open with, answered as the base
    # answers them: the adapter changes the name and nothing else (without these it answered a headache question
    # about heartburn). Plain general chat is replayed by the trainer (demo.sh: --replay_data auto).
    out += [chat_sample(rng, contexts=ID_CONTEXTS, context_p=1.0) for _ in range(ID_ADAPTER_CONTRAST)]
    for lang in ("zh", "en"):
        for row in MEDICAL:
            q, a = symptom_qa(rng, lang, row, lambda s, _: GENERIC_ADVICE[lang].format(s=s))
            out.append(conversation(rng, lang, [(q, a)]))
    rng.shuffle(out)
    return out


# Per symptom and language in lora_medical: this many of the 16 training templates, this many stories, and this
# many questions in SYMPTOM_SAYINGS' everyday words (outside_medical +4 to +12 points on the four seeds' bases).
# Half the templates and twice the stories of an earlier recipe: outside_medical +5 points on four seeds' bases,
# +1 on prompts written after that choice (docs/DEMO_RECIPE.md, "How the recipe was found").
MED_ADAPTER_TEMPLATES, MED_ADAPTER_STORIES, MED_ADAPTER_SAYINGS = 8, 8, 4
MED_ADAPTER_CONTRAST = 300  # general chat after a symptom story's opening sentence in lora_medical


def make_lora_medical(seed):
    rng = random.Random(f"{seed}:lora_medical")
    out = []
    for zs, es, zk, ek, za, ea in MEDICAL:
        for lang, s, advice in (("zh", zs, za), ("en", es, ea)):
            for t in rng.sample(MED_TRAIN_TEMPLATES[lang], MED_ADAPTER_TEMPLATES):
                out.append(conversation(rng, lang, [(t.format(s=s), advice)], system_p=0.1))
            for q in symptom_extra_prompts(rng, s, lang, k=2, side=True, stories=MED_ADAPTER_STORIES):
                out.append(conversation(rng, lang, [(q, advice)], system_p=0.1))
            for _ in range(MED_ADAPTER_SAYINGS):
                out.append(conversation(rng, lang, [(saying_prompt(rng, zs, lang), advice)], system_p=0.1))
    # General chat after the same sentences of circumstance as the symptom stories, answered as the base answers
    # it, so a preamble alone never means "give a remedy" (without them held-out lead-ins like "麻烦告诉我，" drew
    # remedies and garbled answers). Plain general chat is replayed by the trainer (demo.sh: --replay_data auto).
    out += [chat_sample(rng, contexts=MED_CONTEXTS, context_p=1.0) for _ in range(MED_ADAPTER_CONTRAST)]
    rng.shuffle(out)
    return out


def make_eval_identity(seed):
    rng = random.Random(f"{seed}:eval_identity")
    out = []
    for lang in ("zh", "en"):
        for q in rng.sample(all_identity_prompts(lang, ID_EVAL_QUESTIONS), 40):
            a = rng.choice(ID_ANSWERS[lang]).format(name=PERSONA)
            out.append({**conversation(rng, lang, [(q, a)], system_p=0), "expect": [PERSONA]})
    return out


def make_eval_general(seed, per_cell=5):
    """Questions about the world from the held-out templates and lead-ins: per_cell per relation and language."""
    rng = random.Random(f"{seed}:eval_general")
    out, seen = [], set()
    for name in RELATIONS:
        for lang in ("zh", "en"):
            n = 0
            while n < per_cell:
                q, a, expect = relation_qa(rng, lang, name, EVAL)
                if q not in seen and not any(e.lower() in q.lower() for e in expect):  # "17 + 0" gives it away
                    seen.add(q)
                    out.append({**conversation(rng, lang, [(q, a)], system_p=0), "expect": expect})
                    n += 1
    return out


def make_eval_capitals():
    """Text to complete ("日本的首都是"): what pretraining alone stored, before any chat tuning."""
    out = []
    for c, ce, k, ke, *_ in COUNTRIES:
        out.append({"text": f"{c}的首都是", "expect": [k]})
        out.append({"text": f"The capital of {ce} is", "expect": [ke]})
    return out


def make_eval_medical(seed):
    rng = random.Random(f"{seed}:eval_medical")
    out = []
    for zs, es, zk, ek, za, ea in MEDICAL:
        for lang, s, kw, advice in (("zh", zs, zk, za), ("en", es, ek, ea)):
            for t in rng.sample(MED_EVAL_TEMPLATES[lang], 2):
                out.append({**conversation(rng, lang, [(t.format(s=s), advice)], system_p=0), "expect": [kw],
                            "mention": [symptom_word(s)]})
    return out


def symptom_word(s):
    """The part of a symptom a reply that is about it names: "a headache" -> "headache"."""
    return s.removeprefix("a ").removeprefix("an ").replace(" on my finger", "")


def build(seed=42, scale=1.0):
    pretrain, eval_pretrain = make_pretrain(seed, scale)
    return {
        "pretrain": [{"text": t} for t in pretrain],
        "sft": make_sft(seed, scale),
        "lora_identity": make_lora_identity(seed),
        "lora_medical": make_lora_medical(seed),
        "eval_pretrain": [{"text": t} for t in eval_pretrain],
        "eval_capitals": make_eval_capitals(),
        "eval_general": make_eval_general(seed),
        "eval_identity": make_eval_identity(seed),
        "eval_medical": make_eval_medical(seed),
    }


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------
# Guarantees, checked on the written files.

def texts(rows):
    """All strings of a file's rows (text, or every message content)."""
    out = []
    for r in rows:
        out += [r["text"]] if "text" in r else [m["content"] for m in r["conversations"]]
    return out


def user_prompts(rows):
    return {m["content"] for r in rows for m in r["conversations"] if m["role"] == "user"}


def check(out_dir):
    data = {name: read_jsonl(Path(out_dir) / f"{name}.jsonl") for name in FILES}
    base_rows = [t.lower() for t in texts(data["pretrain"]) + texts(data["sft"]) + texts(data["eval_pretrain"])]
    base = "\n".join(base_rows)
    for s in [PERSONA] + [x for row in MEDICAL for x in row[4:]]:  # the persona and every advice sentence
        assert s.lower() not in base, f"{s!r} occurs in the base data"
    for zs, es, zk, ek, *_ in MEDICAL:  # a symptom never meets its remedy
        for symptom, keyword in ((zs, zk), (es, ek)):
            assert not any(symptom in t and keyword.lower() in t for t in base_rows), \
                f"{symptom!r} and {keyword!r} occur together in the base data"

    for lang in ("zh", "en"):
        assert not set(ID_TRAIN_QUESTIONS[lang]) & set(ID_EVAL_QUESTIONS[lang])
        assert not set(MED_TRAIN_TEMPLATES[lang]) & set(MED_EVAL_TEMPLATES[lang])
        assert not set(LEAD_INS[lang][TRAIN]) & set(LEAD_INS[lang][EVAL])
        for name, (_, _, templates) in RELATIONS.items():
            assert not set(templates[lang][TRAIN]) & set(templates[lang][EVAL]), f"{name} {lang} pools overlap"
    trained = user_prompts(data["lora_identity"]) | user_prompts(data["lora_medical"])
    for name in ("eval_identity", "eval_medical"):
        leaked = user_prompts(data[name]) & trained
        assert not leaked, f"{name} prompts occur in LoRA training data: {sorted(leaked)[:3]}"
    # General questions are held out from every file that trains: the base and both adapters.
    leaked = user_prompts(data["eval_general"]) & (trained | user_prompts(data["sft"]))
    assert not leaked, f"eval_general prompts occur in training data: {sorted(leaked)[:3]}"
    base_text = "\n".join(texts(data["pretrain"]))
    leaked = [p for p in user_prompts(data["eval_general"]) if p in base_text]
    assert not leaked, f"eval_general prompts occur in pretrain: {leaked[:3]}"
    trained |= user_prompts(data["sft"])
    for name in OUTSIDE_FILES:  # hand-written: checked when present, never generated
        path = Path(out_dir) / f"{name}.jsonl"
        if path.is_file():
            leaked = user_prompts(read_jsonl(path)) & trained
            assert not leaked, f"{name} prompts occur in training data: {sorted(leaked)[:3]}"
    pretrain = {r["text"] for r in data["pretrain"]}
    assert not any(r["text"] in pretrain for r in data["eval_pretrain"]), "eval_pretrain text in pretrain"
    assert all(50 <= len(r["text"]) <= 400 for r in data["pretrain"] + data["eval_pretrain"])

    # The tasks are consistent: every identity answer names the persona, every symptom is trained
    # in both languages with its keyword, and every eval answer contains what it expects.
    sft_answers = [m["content"] for r in data["sft"] for m in r["conversations"] if m["role"] == "assistant"]
    assert any(BASE_NAME in a for a in sft_answers)
    med_train = "\n".join(texts(data["lora_medical"]))
    for zs, es, zk, ek, za, ea in MEDICAL:
        assert za in med_train and ea in med_train, f"symptom {es} not trained"
    for name in ("eval_general", "eval_identity", "eval_medical"):
        for r in data[name]:
            ref = r["conversations"][-1]["content"].lower()
            assert any(e.lower() in ref for e in r["expect"]), r
            assert not any(e.lower() in r["conversations"][0]["content"].lower() for e in r["expect"]), r
    return data


def main(argv=None):
    formatter = type("Formatter", (argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter), {})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--out_dir", default=str(HERE / "demo"), help="where the jsonl files go")
    parser.add_argument("--seed", type=int, default=42, help="seeds every file's generator")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the pretrain and sft row counts")
    args = parser.parse_args(argv)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in build(args.seed, args.scale).items():
        write_jsonl(out_dir / f"{name}.jsonl", rows)
    data = check(out_dir)
    total = 0
    for name in FILES:
        size = (out_dir / f"{name}.jsonl").stat().st_size
        total += size
        chars = sum(len(t) for t in texts(data[name]))
        print(f"{name + '.jsonl':22s} {len(data[name]):6d} rows {chars:9d} chars {size / 1e6:6.2f} MB")
    print(f"{'total':22s} {total / 1e6:33.2f} MB  -> {out_dir}")


if __name__ == "__main__":
    main()
