"""Audio in and out: encoding streamed speech in the formats clients ask for, decoding uploads block by
block (``codecs``), and when each character of a text is spoken (``speech_timing``)."""
