from twisted.application.service import ServiceMaker

estat_ingest = ServiceMaker(
    "Estat Ingest", "estat.tap", "HTTP event ingest to gzip'd JSON Lines on S3", "estat-ingest"
)
