"""The toy world the quickstart, the replication and the tests train in, offline: LAION-style shards of drawn
shapes (`synthetic`), "pretrained" third towers trained here (`pretrain`), and the experiment runner (`experiments`,
`quickstart`). Not the library: nothing outside `toy` imports it."""
