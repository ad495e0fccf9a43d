"""Dataset readers, the dataset index, EXIF handling, the demo data and the prepare stage."""
