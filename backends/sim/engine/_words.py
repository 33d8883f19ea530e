"""Common English words: one token each in the stand-in tokenizer, and the vocabulary of generated text.

Ordered roughly by frequency. The order fixes the token ids, so append new words at the end only.
"""

from __future__ import annotations

_COMMON_WORDS_TEXT = """
the of and to a in is it you that he was for on are with as his they be at one have this from or had by
not word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him two
has look more day could go come did number sound no most people my over know water than call first who
may down side been now find any new work part take get place made live where after back little only
round man year came show every good me give our under name very through just form sentence great think
say help low line differ turn cause much mean before move right boy old too same tell does set three
want air well also play small end put home read hand port large spell add even land here must big high
such follow act why ask men change went light kind off need house picture try us again animal point
mother world near build self earth father head stand own page should country found answer school grow
study still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend
began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half rock order
fire south problem piece told knew pass since top whole king space heard best hour better true during
hundred five remember step early hold west ground interest reach fast verb sing listen six table travel
less morning ten simple several vowel toward war lay against pattern slow center love person money serve
appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry
dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green oh quick develop ocean warm free minute strong special mind
behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane stead dry
wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant
fill east paint language among grand ball yet wave drop heart am present heavy dance engine position arm
wide sail material size vary settle speak weight general ice matter circle pair include divide syllable
felt perhaps pick sudden count square reason length represent art subject region energy hunt probable
bed brother egg ride cell believe fraction forest sit race window store summer train sleep prove lone
leg exercise wall catch mount wish sky board joy winter sat written wild instrument kept glass grass cow
job edge sign visit past soft fun bright gas weather month million bear finish happy hope flower clothe
strange gone jump baby eight village meet root buy raise solve metal whether push seven paragraph third
shall held hair describe cook floor either result burn hill safe cat century consider type law bit coast
copy phrase silent tall sand soil roll temperature finger industry value fight lie beat excite natural
view sense ear else quite broke case middle kill son lake moment scale loud spring observe child
straight consonant nation dictionary milk speed method organ pay age section dress cloud surprise quiet
stone tiny climb cool design poor lot experiment bottom key iron single stick flat twenty skin smile
crease hole trade melody trip office receive row mouth exact symbol die least trouble shout except wrote
seed tone join suggest clean break lady yard rise bad blow oil blood touch grew cent mix team wire cost
lost brown wear garden equal sent choose fell fit flow fair bank collect save control decimal gentle
woman captain practice separate difficult doctor please protect noon whose locate ring character insect
caught period indicate radio spoke atom human history effect electric expect crop modern element hit
student corner party supply bone rail imagine provide agree thus capital chair danger fruit rich thick
soldier process operate guess necessary sharp wing create neighbor wash bat rather crowd corn compare
poem string bell depend meat rub tube famous dollar stream fear sight thin triangle planet hurry chief
colony clock mine tie enter major fresh search send yellow gun allow print dead spot desert suit current
lift rose continue block chart hat sell success company subtract event particular deal swim term
opposite wife shoe shoulder spread arrange camp invent cotton born determine quart nine truck noise
level chance gather shop stretch throw shine property column molecule select wrong gray repeat require
broad prepare salt nose plural anger claim continent oxygen sugar death pretty skill women season
solution magnet silver thank branch match suffix especially fig afraid huge sister steel discuss forward
similar guide experience score apple bought led pitch coat mass card band rope slip win dream evening
condition feed tool total basic smell valley nor double seat arrive master track parent shore division
sheet substance favor connect post spend chord fat glad original share station dad bread charge proper
bar offer segment slave duck instant market degree populate chick dear enemy reply drink occur support
speech nature range steam motion path liquid log meant quotient teeth shell neck data model server
request cache token memory network latency throughput batch queue prefix router gateway cluster node
rank layer attention expert compute bandwidth prompt response user assistant question answer system
message function value result error default config update version however therefore because although
important information between different following another without within around across against along
before after during under over above below since until upon into onto toward
"""
COMMON_WORDS: tuple[str, ...] = tuple(_COMMON_WORDS_TEXT.split())

# Frequent word endings and stems: a word outside COMMON_WORDS is spelled with these before 1-3 letter chunks.
_WORD_PIECES_TEXT = """
ation ations ition ational tion tions sion sions ness ment ments ally ably able ible ance ence ances
ences ship less ful ical ically ings ing ted ded ling ring ated ating ates ized ize izes ise ity ities
ous ously ive ively ism ist ists ence ency ancy ular ure ures ture tures ever ight ould ought ound ould
ward wards ther other ents ent ant ants ory ary ery ial ian ians ious ened ening ers est iest ier ily
ery con com pro pre dis tran trans inter under over some thing where self every
"""
WORD_PIECES: tuple[str, ...] = tuple(_WORD_PIECES_TEXT.split())

_MORE_WORDS_TEXT = """
worst times wisdom belief season despair everything going heaven area areas business case cases company
companies government group groups problem problems fact facts hand hands eye eyes job jobs night nights
point points home homes water room rooms mother area money story issue issues side sides kind head house
service services friend friends father power hour game line end member members law car city community
name president team minute idea kid body information back parent face others level office door health
person art war history party result change morning reason research girl guy moment air teacher force
education policy market process experience support development project include including included
provides provided using used uses making made makes gets getting took taken seen seeing knows known
knowing told telling asked asking working worked works called calling tried trying needs needed means
meant felt feeling become became becomes leave leaving left understand understanding shows showed
showing things years days ways words people's models example examples important possible available
different similar specific general particular simple complex large larger largest small smaller smallest
high higher highest low lower lowest early earlier later latest recent recently usually generally often
sometimes always never already still again almost quite really simply actually especially finally
directly quickly slowly easily clearly likely unlikely probably perhaps maybe several various certain
whole entire single multiple total average typical common rare major minor main first second third last
next previous following current future past present new old young modern ancient able unable free full
empty open closed public private local global national international social political economic financial
personal natural human physical mental medical legal technical scientific digital performance efficient
efficiency request requests response responses server servers client clients computer computers software
hardware program programs programming code data database file files user users application applications
interface interfaces function functions method methods object objects class classes value values
variable variables parameter parameters option options setting settings configuration default error
errors warning warnings message messages output input inputs outputs text texts string strings number
numbers integer list lists array arrays table tables key keys index indexes memory cache caches disk
network networks connection connections protocol protocols security access control system systems
service library package packages module modules version versions release releases feature features test
tests testing question questions answer answers problem solution solutions approach approaches strategy
strategies goal goals model training learning machine language languages large token tokens prompt
prompts context attention layer layers weights parameters compute memory bandwidth latency throughput
speed faster slower fastest time
"""
MORE_WORDS: tuple[str, ...] = tuple(_MORE_WORDS_TEXT.split())
