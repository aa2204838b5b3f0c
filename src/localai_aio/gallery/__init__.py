"""Model gallery: named entries in conf/gallery.yaml, installed into the models directory."""
