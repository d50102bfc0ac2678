# placeholder 49999
